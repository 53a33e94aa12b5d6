"""Running under SLURM and surviving it: one handler of the preemption signal, srun's tasks as the run's processes,
checkpoints resumed only when complete, and cache locks that hold on any shared file system."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from alignexp.args import HardwareArgs
from alignexp.errors import AlignexpError

SRUN_8 = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
          "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_JOB_ID": "77"}


@pytest.fixture
def srun(monkeypatch):
    """The environment of one of 8 tasks that ``srun --ntasks-per-node=8`` started on one node."""
    for key, value in SRUN_8.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


# -- srun ----------------------------------------------------------------------------------------------------
def test_devices_auto_under_srun_is_the_tasks_per_node(srun):
    """Each task may see one GPU or eight: the run's processes are srun's tasks either way, none launched."""
    from alignexp.scale.launch import _cluster, devices_per_node

    hw = HardwareArgs(name="ddp", accelerator="gpu", devices="auto", strategy="ddp", precision="bf16-mixed")
    for visible in (1, 8):
        srun.setattr(torch.cuda, "device_count", lambda v=visible: v)
        assert devices_per_node(hw) == 8
    assert _cluster(8).creates_processes_externally  # SLURM's tasks: alignexp starts no process of its own
    srun.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    srun.setenv("SLURM_NNODES", "2")
    assert devices_per_node(hw) == 4


def test_a_layout_that_is_not_sruns_is_refused_before_any_process_starts(srun):
    from alignexp.scale.launch import check_slurm_layout, launched

    srun.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(AlignexpError, match="srun started 8 tasks, but the run has 4 processes"):
        with launched(HardwareArgs(name="ddp", accelerator="gpu", devices=4, strategy="ddp")):
            pass
    srun.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task=1: Lightning's rank i needs GPU i
    with pytest.raises(AlignexpError, match="each task sees 1 GPU"):
        check_slurm_layout(HardwareArgs(name="ddp", accelerator="gpu", devices="auto", strategy="ddp"))
    check_slurm_layout(HardwareArgs(name="cpu", accelerator="cpu", devices=8))  # CPU tasks: nothing to see


def test_one_handler_of_usr1_under_slurm(srun):
    """Lightning's SLURM environment comes without its auto-requeue: building and starting the Trainer registers
    no USR1 handler, so the project's preemption callback is the only one that saves and requeues."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from alignexp.scale.hardware import trainer_kwargs

    srun.setenv("SLURM_NTASKS", "1")
    srun.setenv("SLURM_NTASKS_PER_NODE", "1")
    kwargs = trainer_kwargs(HardwareArgs(threads=1))
    environments = [p for p in kwargs["plugins"] if isinstance(p, SLURMEnvironment)]
    assert len(environments) == 1 and environments[0].auto_requeue is False
    trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False)
    assert trainer._accelerator_connector.cluster_environment is environments[0]
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is before
    finally:
        trainer._signal_connector.teardown()


def test_a_handler_of_lightnings_is_not_handed_the_preemption(monkeypatch):
    """Where Lightning's SLURM handler was installed anyway (its environment chosen by Lightning itself), the
    preemption is not handed to it (it would save its own checkpoint and requeue a second time): one
    ``scontrol requeue``, and Lightning's handler never runs."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    import alignexp.pipeline.fit as fit_module
    from alignexp.pipeline.fit import Preempted, Preemption, _is_lightnings

    ran, calls = [], []
    lightnings = _HandlersCompose([lambda *a: ran.append(a)])
    assert _is_lightnings(lightnings) and not _is_lightnings(lambda *a: None) and not _is_lightnings(signal.SIG_DFL)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(fit_module.subprocess, "call", lambda command: calls.append(command))
    preemption = Preemption(Path("last.ckpt"))
    preemption.previous, preemption.received = {signal.SIGUSR1: lightnings}, signal.SIGUSR1
    with pytest.raises(Preempted):
        preemption.hand_over()
    assert ran == [] and calls == [["scontrol", "requeue", "77"]]


# -- checkpoints ---------------------------------------------------------------------------------------------
def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    """A torn ``last.ckpt`` (newest by time, no completion marker: the process died while its shards were written)
    is passed over for the complete SLURM checkpoint; the marker's step, not the file time, says which is newest."""
    from alignexp.pipeline.fit import latest_checkpoint

    (tmp_path / "hpc_ckpt_1.ckpt").mkdir()  # DeepSpeed and FSDP2 write folders
    (tmp_path / "hpc_ckpt_1.ckpt.complete").write_text(json.dumps({"global_step": 40, "time": 1.0}))
    time.sleep(0.01)
    (tmp_path / "last.ckpt").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "last.ckpt.complete").write_text(json.dumps({"global_step": 30, "time": 2.0}))
    assert latest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"  # older step, though written later
    (tmp_path / "last.ckpt.complete").write_text(json.dumps({"global_step": 50, "time": 2.0}))
    assert latest_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    assert latest_checkpoint(tmp_path / "none") is None


class _Strategy:
    def __init__(self):
        self.barriers = []

    def barrier(self, name=None):
        self.barriers.append(name)


class _Trainer:
    is_global_zero, global_step, current_epoch = True, 7, 1

    def __init__(self, fail: bool = False):
        self.strategy, self.fail = _Strategy(), fail

    def save_checkpoint(self, filepath, weights_only=False, storage_options=None):
        Path(filepath).mkdir(exist_ok=True)
        if self.fail:
            raise RuntimeError("killed while writing the shards")


def test_a_checkpoint_is_marked_complete_only_after_every_rank_saved_it(tmp_path):
    from alignexp.pipeline.fit import complete_marked

    path = tmp_path / "last.ckpt"
    trainer = _Trainer()
    complete_marked(trainer)
    trainer.save_checkpoint(path)
    marker = json.loads((tmp_path / "last.ckpt.complete").read_text())
    assert marker["global_step"] == 7 and trainer.strategy.barriers == ["checkpoint-unmark", "checkpoint-saved"]
    failing = _Trainer(fail=True)
    complete_marked(failing)
    with pytest.raises(RuntimeError):
        failing.save_checkpoint(path)  # the old marker went before the overwrite began
    assert not (tmp_path / "last.ckpt.complete").exists()


# -- cache locks ----------------------------------------------------------------------------------------------
def test_the_cache_lock_is_exclusive_and_needs_no_flock(tmp_path, monkeypatch):
    """``flock`` is node-local or refused (ENOLCK) on some parallel file systems: the lock never calls it."""
    import fcntl

    from alignexp.files import FileLock, file_lock

    def refused(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    entry = tmp_path / "entry"
    first, second = FileLock(entry), FileLock(entry)
    assert first.try_acquire() and not second.try_acquire()
    assert first.holder().endswith(f":{__import__('os').getpid()}")
    first.release()
    assert second.try_acquire()
    second.release()
    with file_lock(entry):
        assert (tmp_path / ".entry.xlock").exists()
    assert not (tmp_path / ".entry.xlock").exists()


def test_a_dead_holders_lock_is_broken_and_a_live_one_is_not(tmp_path):
    """A lock file whose holder stopped touching it (a job killed on another node) is taken after ``stale``
    seconds without a change; one whose holder's heartbeat runs is never taken."""
    from alignexp.files import FileLock

    entry = tmp_path / "entry"
    (tmp_path / ".entry.xlock").write_text('{"host": "node7", "pid": 1}')
    waiter = FileLock(entry, stale=0.3)
    assert not waiter.try_acquire()
    time.sleep(0.4)
    assert waiter.try_acquire()
    waiter.release()

    live = FileLock(entry, heartbeat=0.05)
    assert live.try_acquire()
    other = FileLock(entry, stale=0.3)
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        assert not other.try_acquire()
        time.sleep(0.05)
    live.release()
    assert other.try_acquire()
    other.release()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_at_once_and_old_lock_files_are_ignored(tmp_path):
    """A job killed on this node leaves its lock file: its pid is gone, so no wait. The empty ``.<name>.lock``
    files that the earlier ``flock`` lock left in caches hold nothing."""
    import socket
    import subprocess
    import sys

    from alignexp.files import FileLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    entry = tmp_path / "entry"
    (tmp_path / ".entry.lock").write_text("")  # the earlier scheme's file
    (tmp_path / ".entry.xlock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    lock = FileLock(entry, stale=3600)
    assert lock.try_acquire()
    lock.release()
