"""Files written so that a reader never sees half of one, and the keys of on-disk caches.

Every write goes to a temporary name unique to its process (``.<name>.<pid>-<random>.tmp``) in the
destination's folder and is renamed into place, so concurrent writers (ranks, sweep jobs) never share
a temporary file, and a file that exists is whole. A folder is written the same way
(:func:`atomic_folder`); if another writer finished the same folder first, its copy is kept.
:func:`file_lock` lets one process at a time compute a cache entry, so concurrent jobs compute it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def digest(*parts: object) -> str:
    """A short, stable key for JSON-able ``parts`` (dict order does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a unique temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, record: object) -> Path:
    return atomic_write_text(path, json.dumps(record, indent=2, default=str))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary folder to fill; on success it becomes ``path`` (an existing ``path``
    written meanwhile by another process is kept, and this copy dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock for the cache entry ``path``, held by this process until the block ends: the
    ``flock`` of ``.<name>.lock`` beside it (waits while another process, e.g. a concurrent sweep job,
    holds it; released by the kernel if the holder dies)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
