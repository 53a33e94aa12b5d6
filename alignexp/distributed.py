"""The ranks of a run, and the few collectives its stages use: gather, broadcast, barrier, and a cache that
N ranks fill together and rank 0 writes once.

A run on N processes is launched once, before its first stage (:func:`alignexp.scale.hardware.launched`), so
every stage runs on every rank. With one process (no process group) every helper here is the trivial
one: rank 0 of 1, a gather of one. All ranks call the collectives in the same order: they see the same
data (gathered, never rank-local), so their control flow is the same.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from alignexp.files import (
    FileLock,
    entries_of_other_code,
    file_lock,
    move_aside,
    verify_entry,
    write_manifest,
)

T = TypeVar("T")

_CACHE_RECORDERS: list[list[Path]] = []


@contextmanager
def caches_used() -> Iterator[list[Path]]:
    """A list that collects the path of every cache entry :func:`shared_cache` reads or writes meanwhile
    (a run's provenance: the SFT policy, the preference data, the reference log-probs it used)."""
    used: list[Path] = []
    _CACHE_RECORDERS.append(used)
    try:
        yield used
    finally:
        _CACHE_RECORDERS.remove(used)
R = TypeVar("R")

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether this process is one of several (a process group is initialised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints results."""
    return rank() == 0


def env_rank() -> int:
    """This process's global rank from the environment its launcher set (0 without one), readable before
    the process group exists: ``RANK`` (torchrun, alignexp's own launcher) or SLURM's ``SLURM_PROCID``."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def local_rank() -> int:
    """This process's index on its node (0 without a launcher): which GPU it takes."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(value: T, src: int = 0) -> T:
    """``value`` of rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def shard_map(fn: Callable[[int], R], n: int, desc: str | None = None, *, items: Sequence[int] | None = None,
              unit: str = "batch", tokens: Callable[[R], int] | None = None) -> list[R]:
    """``[fn(0), ..., fn(n - 1)]`` with unit i computed on rank ``i % world_size()`` and gathered in order.

    Each unit (a batch of a forward, a chunk of prompts to sample) is computed exactly as one process
    would compute it, so the gathered result equals the one-process result bit for bit. ``desc``: a
    progress bar of rank 0's work with that title (on a terminal only; rate and ETA), counting units, or
    ``items[i]`` things of ``unit`` for unit i (the prompts of a chunk); ``tokens(result)``: the tokens a
    unit generated, shown as tokens per second.
    """
    size, me = world_size(), rank()
    units = range(me, n, size)
    bar = None
    if desc is not None and me == 0:
        from tqdm.auto import tqdm

        total = sum(items[i] for i in units) if items is not None else len(units)
        bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None, dynamic_ncols=True)
    mine, generated, start = [], 0, time.time()
    for i in units:
        mine.append(fn(i))
        if bar is not None:
            if tokens is not None:
                generated += tokens(mine[-1])
                bar.set_postfix_str(f"{generated / max(time.time() - start, 1e-9):.0f} tokens/s", refresh=False)
            bar.update(items[i] if items is not None else 1)
    if bar is not None:
        bar.close()
    if size == 1:
        return mine
    per_rank = all_gather(mine)
    return [per_rank[i % size][i // size] for i in range(n)]


def shard_batches(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], batch_size: int,
                  desc: str | None = None) -> list[R]:
    """``fn`` over ``items`` in batches of ``batch_size`` (``fn`` returns one result per item), the batches
    sharded over ranks by :func:`shard_map` and the results gathered in order."""
    starts = range(0, len(items), batch_size)
    per_batch = shard_map(lambda i: fn(items[starts[i]:starts[i] + batch_size]), len(starts), desc)
    return [result for batch in per_batch for result in batch]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` computed on rank 0 alone and its result broadcast: for work that must not be repeated or
    split (a judge's API calls and counters), or that is cheap."""
    return broadcast(fn() if is_main() else None)


LOCK_POLL_S = 5.0
"""How often the ranks of a run agree on whether rank 0 has taken a cache entry's lock."""


@contextmanager
def _lock_on_main(path: Path) -> Iterator[None]:
    """Rank 0 holds ``path``'s :class:`~alignexp.files.FileLock` for the block; every rank waits for it in short
    rounds (one broadcast each, then a sleep), never in one collective that could time out."""
    if not is_distributed():
        with file_lock(path):
            yield
        return
    lock = FileLock(path) if is_main() else None
    waited = 0.0
    while not broadcast(lock.try_acquire() if lock is not None else None):
        time.sleep(LOCK_POLL_S)
        waited += LOCK_POLL_S
        if lock is not None and waited % 300 < LOCK_POLL_S:
            log.info("waiting %.0f s for %s (held by %s)", waited, lock.lock, lock.holder())
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def shared_cache(path: Path, compute: Callable[[], T], save: Callable[[T, Path], None], load: Callable[[Path], T],
                 exists: Callable[[Path], bool] = Path.exists, what: str = "cache entry") -> T:
    """The value cached at ``path``: loaded by every rank when it is there; otherwise computed by all ranks
    together (``compute`` may shard its work and gather), written by rank 0 alone (``save`` must write
    under a unique temporary name and rename, :mod:`alignexp.files`), and read back by no one.

    Rank 0 holds a lock on ``path`` (:class:`alignexp.files.FileLock`) from the check to the write, so a
    concurrent job that needs the same entry waits and then loads it, instead of computing it again or
    reading half of it. While rank 0 waits for another job's lock, no rank sits in a collective: they agree
    every ``LOCK_POLL_S`` seconds in a short broadcast (:func:`_lock_on_main`), so the wait may last longer
    than the process group's timeout (another job's first 7B SFT policy takes hours). Rank 0 writes the
    entry's manifest (:func:`alignexp.files.write_manifest`) after it, and checks an entry against it before
    anyone reads it: an entry that is incomplete, fails its checksum or has no manifest is moved aside and
    rebuilt (so is one that fails to load in a single process), and ``what`` (``"reference log-probs"``)
    names it in the log that says why. Where ``path`` is code-keyed (:func:`alignexp.files.code_keyed`) and
    only other code's entries exist, the log says so.
    """
    for used in _CACHE_RECORDERS:
        used.append(Path(path))
    with _lock_on_main(path):
        found = broadcast(_check_entry(Path(path), exists, what) if is_main() else None)
        if found:
            barrier()
            try:
                return load(path)
            except Exception as error:  # noqa: BLE001 - any reader's failure means the entry is bad
                if world_size() > 1:
                    raise
                aside = move_aside(Path(path))
                log.warning("%s: %s could not be read (%s: %s): moved aside to %s; rebuilding", what, path,
                            type(error).__name__, error, aside.name)
        value = compute()
        if is_main():
            save(value, path)
            write_manifest(Path(path))
        barrier()
        return value


def _check_entry(path: Path, exists: Callable[[Path], bool], what: str) -> bool:
    """Rank 0's verdict on the cache entry ``path``: True where it is there and whole; else False, with a
    partial or unverifiable entry moved aside and the reason logged."""
    if exists(path):
        problem = verify_entry(path)
        if problem is None:
            return True
        aside = move_aside(path)
        log.warning("%s: %s failed verification (%s): moved aside to %s; rebuilding", what, path, problem, aside.name)
        return False
    if path.exists():  # a folder without what makes it an entry: an interrupted copy
        aside = move_aside(path)
        log.warning("%s: %s is incomplete: moved aside to %s; rebuilding", what, path, aside.name)
        return False
    others = entries_of_other_code(path)
    if others:
        newest = max(others, key=lambda p: p.stat().st_mtime)
        log.info("%s: the cached %s was made by other code (a module that shapes it changed): building %s",
                 what, newest.name, path.name)
    return False
