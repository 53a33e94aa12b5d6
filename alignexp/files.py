"""Files written so that a reader never sees half of one, and the keys of on-disk caches.

Every write goes to a temporary name unique to its process (``.<name>.<pid>-<random>.tmp``) in the
destination's folder and is renamed into place, so concurrent writers (ranks, sweep jobs) never share
a temporary file, and a file that exists is whole. A folder is written the same way
(:func:`atomic_folder`); if another writer finished the same folder first, its copy is kept.
:func:`file_lock` (:class:`FileLock`) lets one process at a time compute a cache entry, so concurrent jobs, on
one node or several, compute it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


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


class FileLock:
    """An exclusive lock for the cache entry ``path`` that holds across the nodes of a shared file system: the
    lock file ``.<name>.xlock`` beside it, created with ``O_CREAT | O_EXCL`` (atomic on local file systems,
    NFSv3+, Lustre and GPFS, where ``flock`` may be node-local or missing). The holder touches it every
    ``heartbeat`` seconds from a thread; a waiter that sees its modification time unchanged for ``stale``
    seconds of its own clock (no clock is compared across machines), or a holder on its own host whose
    process is gone, takes the holder for dead and breaks the lock. The file names the holder (host, pid)."""

    def __init__(self, path: str | Path, heartbeat: float = 20.0, stale: float = 180.0):
        path = Path(path)
        # not ".<name>.lock": the flock of earlier versions left such files behind in existing caches
        self.lock = path.with_name(f".{path.name}.xlock")
        self.heartbeat, self.stale = heartbeat, stale
        self._stop: threading.Event | None = None
        self._seen: tuple[float, float] | None = None  # (the lock's mtime, when this process first saw it)

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or its holder is dead); True when this process holds it now."""
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not self._break_if_stale():
                return False
            try:  # the dead holder's lock is gone: take it, unless another waiter was quicker
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="alignexp-lock-heartbeat").start()
        return True

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat):
            try:
                os.utime(self.lock)
            except OSError:
                return

    def _break_if_stale(self) -> bool:
        """Remove the lock file if its holder is dead (no heartbeat for ``stale`` seconds); True if it did."""
        try:
            mtime = self.lock.stat().st_mtime
        except FileNotFoundError:
            return True
        now = time.monotonic()
        if self._holder_is_gone():
            pass
        elif self._seen is None or self._seen[0] != mtime:
            self._seen = (mtime, now)
            return False
        elif now - self._seen[1] < self.stale:
            return False
        broken = self.lock.with_name(f"{self.lock.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.broken")
        try:
            os.rename(self.lock, broken)  # one waiter wins; the others find no lock to rename
        except FileNotFoundError:
            return False
        self._seen = None
        if broken.stat().st_mtime != mtime:  # a new holder took it meanwhile: give it back
            try:
                os.link(broken, self.lock)
            except OSError:
                pass
            broken.unlink(missing_ok=True)
            return False
        log.warning("broke the lock %s of %s: no heartbeat for %.0f s", self.lock, self._describe(broken), self.stale)
        broken.unlink(missing_ok=True)
        return True

    def _holder_is_gone(self) -> bool:
        """Whether the lock's holder is a process of this host that no longer exists."""
        try:
            record = json.loads(self.lock.read_text())
            if record["host"] != socket.gethostname():
                return False
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return False

    @staticmethod
    def _describe(path: Path) -> str:
        try:
            record = json.loads(path.read_text())
            return f"{record['host']}:{record['pid']}"
        except (OSError, ValueError, KeyError):
            return "an unknown holder"

    def holder(self) -> str:
        """``host:pid`` of the process that holds the lock."""
        return self._describe(self.lock)

    def acquire(self, poll: float = 1.0) -> None:
        """Wait for the lock (logging who holds it every few minutes) and take it."""
        waited, next_note = 0.0, 60.0
        while not self.try_acquire():
            time.sleep(poll)
            waited += poll
            if waited >= next_note:
                log.info("waiting %.0f s for %s (held by %s)", waited, self.lock, self.holder())
                next_note *= 2

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            self.lock.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """:class:`FileLock` on the cache entry ``path``, held by this process until the block ends (waits while
    another process, e.g. a concurrent sweep job on another node, holds it)."""
    lock = FileLock(path)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
