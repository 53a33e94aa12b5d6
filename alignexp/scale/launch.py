"""Launching a run on N processes once, before its first stage, so that every stage runs on every rank.

:func:`launched` is the one entry: with one process it does nothing. With several it joins the
processes a cluster started (torchrun's ``RANK``/``LOCAL_RANK``, SLURM's ``srun`` with one task per
device), or, where none did, starts them itself: the first process starts the other ``devices - 1``
of its node with the same command (the Hydra job's own overrides, and its run folder, so every rank
writes to the same place), as Lightning's launcher would at the first ``fit``, but before anything
else runs. Each process then takes its GPU from its local rank, joins the process group, and
Lightning's Trainer finds the processes already there (``LOCAL_RANK`` is set) and starts none.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from alignexp.args import HardwareArgs
from alignexp.distributed import is_distributed
from alignexp.errors import AlignexpError

log = logging.getLogger(__name__)

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")
TIMEOUT = timedelta(minutes=60)
"""How long a rank waits in one collective (rank 0 saving a 7B policy while the others wait at a barrier). A
wait for another job's cache lock is not one collective: the ranks agree in short rounds
(:func:`alignexp.distributed.shared_cache`)."""


def slurm_tasks() -> int:
    """The tasks SLURM started for this job step (``srun``, one per process), 0 outside one: Lightning's test
    (``SLURM_NTASKS`` set, and not an interactive ``bash`` allocation)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return int(os.environ.get("SLURM_NTASKS", "0") or 0) if SLURMEnvironment.detect() else 0


def slurm_tasks_per_node() -> int | None:
    """Tasks per node of this SLURM job step (``SLURM_NTASKS_PER_NODE``, e.g. ``8`` or ``8(x2)``; else tasks over
    nodes), None outside one."""
    tasks = slurm_tasks()
    if tasks <= 1:
        return None
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if per_node:
        return int(per_node.split("(")[0].split(",")[0])
    return max(1, tasks // int(os.environ.get("SLURM_NNODES", "1") or 1))


def devices_per_node(hw: HardwareArgs) -> int:
    """The processes of one node: ``hardware.devices`` (``auto``/-1: the tasks per node where ``srun`` started one
    task per process, whatever GPUs each task sees; else every visible GPU, or 1 on the CPU)."""
    if isinstance(hw.devices, list):
        return len(hw.devices)
    if hw.devices in ("auto", -1):
        per_task = slurm_tasks_per_node()
        if per_task is not None:
            return per_task
        if hw.device_type == "cuda":
            import torch

            return max(1, torch.cuda.device_count())
        return 1
    return int(hw.devices)


def check_slurm_layout(hw: HardwareArgs) -> None:
    """Under ``srun`` (one task per process): the run's processes must be srun's tasks, and each task must see
    every GPU of its node (Lightning gives local rank i the node's GPU i). Raises :class:`AlignexpError`
    naming the settings otherwise, before any process or process group is started."""
    tasks = slurm_tasks()
    if tasks <= 1:
        return
    per_node = devices_per_node(hw)
    if per_node * hw.num_nodes != tasks:
        raise AlignexpError(f"srun started {tasks} tasks, but the run has {per_node * hw.num_nodes} processes "
                            f"({per_node} per node x {hw.num_nodes} nodes): set hardware.devices and "
                            f"hardware.num_nodes to srun's tasks per node and nodes (docs/scale.md, SLURM), so that "
                            f"each task is one process and alignexp starts none of its own")
    if hw.device_type == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if visible < per_node:
            raise AlignexpError(f"srun started {per_node} tasks per node, but each task sees {visible} GPU(s): "
                                f"give every task all GPUs of its node (--gpus-per-node={per_node} "
                                f"--ntasks-per-node={per_node}, without --gpus-per-task or --gpu-bind)")


def _cluster(world: int):
    """Lightning's description of who started the processes: torchrun, SLURM (one task per process), or
    nobody yet (alignexp starts them)."""
    from lightning.fabric.plugins.environments import (
        LightningEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) == world:
        return SLURMEnvironment()
    return LightningEnvironment()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def child_command(local_rank: int) -> tuple[list[str], str | None]:
    """The command that starts local rank ``local_rank`` of this run: this module's entry point with the
    Hydra job's own overrides (not a sweep's) in this job's run folder, and the working folder to run it in."""
    import __main__

    entry = [sys.executable, "-m", __main__.__spec__.name] if getattr(__main__, "__spec__", None) \
        else [sys.executable, os.path.abspath(sys.argv[0])]
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return entry + sys.argv[1:], None
    hydra_cfg = HydraConfig.get()
    flags, args = [], iter(sys.argv[1:])
    for arg in args:  # the config search path and name the user gave, not the overrides or -m
        if arg in ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir"):
            flags += [arg, next(args, "")]
        elif arg.startswith(("--config-path=", "--config-name=", "--config-dir=")):
            flags.append(arg)
    from hydra.utils import get_original_cwd

    overrides = list(hydra_cfg.overrides.task)
    return entry + flags + overrides + [f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
                                        "hydra.output_subdir=null", f"hydra.job.name=rank{local_rank}"], \
        get_original_cwd()


def _watch(children: list[subprocess.Popen]) -> None:
    """Stop the whole run when a child process fails (the others would wait for it in a collective)."""
    def run() -> None:
        while True:
            time.sleep(2)
            codes = [child.poll() for child in children]
            if all(code == 0 for code in codes):
                return
            failed = [(i + 1, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                print(f"[alignexp] local rank {failed[0][0]} exited with code {failed[0][1]}: stopping the "
                      f"other processes of the run", file=sys.stderr, flush=True)
                for child in children:
                    if child.poll() is None:
                        child.kill()
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=run, daemon=True, name="alignexp-rank-watch").start()


def quiet_unless_main(rank: int | None = None) -> None:
    """One voice: a process other than rank 0 (``rank``, else the one its launcher set in the environment, so
    before the process group exists: the checks a started process runs again) logs warnings and errors only."""
    from alignexp.distributed import env_rank

    if (env_rank() if rank is None else rank) != 0:
        logging.getLogger("alignexp").setLevel(logging.WARNING)


@contextmanager
def launched(hw: HardwareArgs) -> Iterator[int]:
    """Run the block on every process of ``hw`` (yields the world size). See the module docstring."""
    check_slurm_layout(hw)
    per_node = devices_per_node(hw)
    world = per_node * hw.num_nodes
    if world == 1 or is_distributed():
        yield world
        return
    import torch
    import torch.distributed as dist

    cluster = _cluster(world)
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    children: list[subprocess.Popen] = []
    if not cluster.creates_processes_externally:  # the first process of each node starts the others
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("NODE_RANK", "0")
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE=str(world),
                          RANK=str(int(os.environ["NODE_RANK"]) * per_node))
        for local in range(1, per_node):
            command, cwd = child_command(local)
            env = {**os.environ, "LOCAL_RANK": str(local),
                   "RANK": str(int(os.environ["NODE_RANK"]) * per_node + local)}
            children.append(subprocess.Popen(command, env=env, cwd=cwd))
        _watch(children)
    if cluster.creates_processes_externally and "RANK" not in os.environ:  # SLURM: its own variables
        rank = cluster.global_rank()
    else:
        rank = int(os.environ.get("RANK") or int(os.environ.get("NODE_RANK", "0")) * per_node + cluster.local_rank())
    cluster.set_world_size(world)
    cluster.set_global_rank(rank)
    os.environ.update(MASTER_ADDR=cluster.main_address, MASTER_PORT=str(cluster.main_port))
    if hw.device_type == "cuda":  # each process its own GPU, before anything is moved to one
        torch.cuda.set_device(cluster.local_rank())
    backend = hw.process_group_backend or ("nccl" if hw.device_type == "cuda" else "gloo")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    quiet_unless_main(rank)
    log.info("%d processes (%d per node x %d nodes, %s), process group %s", world, per_node, hw.num_nodes,
             type(cluster).__name__, backend)
    failed = True
    try:
        yield world
        dist.barrier()
        failed = False
    finally:
        if failed:
            for child in children:
                child.kill()
        dist.destroy_process_group()
        for child in children:
            child.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if any(child.returncode for child in children) and not failed:
            raise AlignexpError(f"a rank of the run exited with code "
                                f"{next(c.returncode for c in children if c.returncode)}")
