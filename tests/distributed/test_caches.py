"""Caches shared by concurrent jobs: one computes an entry while the others wait for it, and nothing torn or
left half-written is ever read (the two-job sweep on a fresh cache used to train the SFT policy twice and
fail renaming its folder)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from tests.distributed.conftest import FAST, check, train


def _job(path: str, log: str, results: str, index: int) -> None:
    from alignexp.distributed import shared_cache
    from alignexp.files import atomic_write_text

    def compute() -> str:
        with open(log, "a") as handle:
            handle.write(f"computed by {index}\n")
        time.sleep(0.5)  # long enough for the other job to arrive while this one holds the entry
        return f"value of {index}"

    value = shared_cache(Path(path), compute, lambda v, p: atomic_write_text(p, v), lambda p: p.read_text())
    with open(results, "a") as handle:
        handle.write(f"{value}\n")


def test_concurrent_jobs_compute_a_cache_entry_once_and_all_read_it(tmp_path):
    """Three processes ask for the same missing entry at once: one computes and writes it under the lock, the
    others wait and read that value; no temporary file is left beside it."""
    entry, log, results = tmp_path / "cache" / "entry.txt", tmp_path / "log", tmp_path / "results"
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_job, args=(str(entry), str(log), str(results), i)) for i in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
    assert all(job.exitcode == 0 for job in jobs)
    computed = log.read_text().splitlines()
    assert len(computed) == 1
    winner = computed[0].split()[-1]
    assert results.read_text().splitlines() == [f"value of {winner}"] * 3
    # the lock file goes with its holder; the manifest stays beside the entry
    assert sorted(p.name for p in entry.parent.iterdir()) == [".entry.txt.manifest.json", "entry.txt"]


def _rank(rank: int, port: int, path: str, results: str) -> None:
    """One of 2 gloo ranks whose process group times out after 3 s, asking for an entry another job holds for 8 s."""
    import datetime
    import os

    import torch.distributed as dist

    import alignexp.distributed as distributed
    from alignexp.files import atomic_write_text

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    distributed.LOCK_POLL_S = 0.5
    value = distributed.shared_cache(Path(path), lambda: "ours", lambda v, p: atomic_write_text(p, v),
                                     lambda p: p.read_text())
    with open(results, "a") as handle:
        handle.write(f"{rank}:{value}\n")
    dist.destroy_process_group()


def _holder(path: str, seconds: float) -> None:
    from alignexp.files import FileLock, atomic_write_text, write_manifest

    lock = FileLock(path, heartbeat=0.5)
    assert lock.try_acquire()
    time.sleep(seconds)
    atomic_write_text(path, "theirs")
    write_manifest(Path(path))  # as shared_cache writes an entry
    lock.release()


def test_ranks_wait_for_another_jobs_lock_longer_than_the_collective_timeout(tmp_path):
    """Another job holds the entry's lock for 8 s; this run's 2 ranks (process group timeout 3 s) wait for it in
    short rounds, then both load the other job's value, instead of dying in a broadcast."""
    import socket

    entry, results = tmp_path / "entry.txt", tmp_path / "results"
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    holder = context.Process(target=_holder, args=(str(entry), 8.0))
    holder.start()
    while not (tmp_path / ".entry.txt.xlock").exists():
        time.sleep(0.05)
    ranks = [context.Process(target=_rank, args=(r, port, str(entry), str(results))) for r in range(2)]
    for process in ranks:
        process.start()
    for process in [holder, *ranks]:
        process.join(120)
    assert [p.exitcode for p in [holder, *ranks]] == [0, 0, 0]
    assert sorted(results.read_text().splitlines()) == ["0:theirs", "1:theirs"]


@pytest.mark.slow
def test_a_two_job_parallel_sweep_on_a_fresh_cache_trains_the_sft_policy_once(tmp_path):
    """The sweep from issue 12: ``-m hydra/launcher=parallel hydra.launcher.n_jobs=2 loss=dpo,ipo`` on an empty
    cache: both jobs complete, one SFT policy folder, one set of rankings, no temporary folder left."""
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    result = check(train("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "loss=dpo,ipo", *FAST,
                         "hardware=cpu", f"hydra.sweep.dir={sweep}", cache=cache))
    jobs = sorted((json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()),
                  key=lambda job: job["num"])
    assert [job["status"] for job in jobs] == ["COMPLETED", "COMPLETED"]
    assert (result.stdout + result.stderr).count("training one (cached at") == 1
    folders = [p.name for p in (cache / "sft").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(folders) == 1 and not list(cache.rglob("*.tmp"))
    assert len(list((cache / "preferences").glob("*.jsonl"))) == 1
