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


# --- cache entries keyed by the code that made them, verified on read ------------------------------------
#
# A cache entry's name ends in ``.c<code>`` (before its suffix), the digest of alignexp's version and the
# source of the modules that shape it, and of the user's ``imports=`` modules: other code gives another name,
# so an entry is never read by code that would not have written it. Beside each entry, rank 0 writes
# ``.<name>.manifest.json``: the sha256 and size of every file of the entry. An entry whose manifest is missing
# or whose files do not match it (a full disk, a partial copy, a shared file system) is moved aside and
# rebuilt, and the log says why.

_USER_MODULES: list[str] = []


def register_user_modules(names: list[str]) -> None:
    """The user's ``imports=`` modules, which may change anything: every cache key includes their source."""
    for name in names:
        if name not in _USER_MODULES:
            _USER_MODULES.append(name)


def _module_source(name: str) -> bytes:
    import importlib.util

    spec = importlib.util.find_spec(name)
    origin = getattr(spec, "origin", None)
    if not origin or not Path(origin).is_file():
        return name.encode()
    return Path(origin).read_bytes()


def code_digest(modules: list[str] | tuple[str, ...]) -> str:
    """12 hex digits: alignexp's version and the source of ``modules`` and of the user's ``imports=``."""
    from alignexp import __version__

    hasher = hashlib.sha256(__version__.encode())
    for name in [*sorted(modules), *_USER_MODULES]:
        hasher.update(name.encode() + b"\0" + _module_source(name) + b"\0")
    return hasher.hexdigest()[:12]


def code_keyed(path: str | Path, modules: list[str] | tuple[str, ...]) -> Path:
    """``path`` with ``.c<code digest>`` before its suffix: ``ref/abc.pt`` -> ``ref/abc.c1a2b3c4d5e6.pt``."""
    path = Path(path)
    suffix = path.suffix if path.suffix in (".pt", ".jsonl", ".json") else ""
    stem = path.name[:-len(suffix)] if suffix else path.name
    return path.with_name(f"{stem}.c{code_digest(modules)}{suffix}")


def _code_free(path: Path) -> tuple[str, str] | None:
    """(stem, suffix) of a code-keyed name, None for a name without a code digest."""
    import re

    found = re.fullmatch(r"(.*)\.c[0-9a-f]{12}(\.pt|\.jsonl|\.json)?", path.name)
    return (found.group(1), found.group(2) or "") if found else None


def entries_of_other_code(path: Path) -> list[Path]:
    """Entries for the same settings as ``path`` made by other code (another ``.c<digest>``)."""
    parts = _code_free(path)
    if parts is None or not path.parent.is_dir():
        return []
    stem, suffix = parts
    return sorted(p for p in path.parent.glob(f"{glob_escape(stem)}.c*{suffix}") if p != path and _code_free(p) == parts)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def manifest_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.manifest.json")


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def write_manifest(path: Path) -> Path:
    """``.<name>.manifest.json`` beside the entry ``path`` (a file or a folder): each file's sha256 and size."""
    path = Path(path)
    files = {(p.relative_to(path).as_posix() if path.is_dir() else p.name): {"sha256": file_sha256(p),
                                                                           "bytes": p.stat().st_size}
             for p in _files_of(path)}
    return atomic_write_json(manifest_path(path), {"entry": path.name, "files": files})


def verify_entry(path: Path) -> str | None:
    """None where the entry ``path`` matches its manifest; else why not (no manifest, a file missing, of
    another size or checksum)."""
    path = Path(path)
    manifest = manifest_path(path)
    if not manifest.is_file():
        return f"no manifest ({manifest.name}): a partial copy, or written by older code"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest {manifest.name} is unreadable ({error})"
    for name, expected in files.items():
        found = path / name if path.is_dir() else path
        if not found.is_file():
            return f"{name} is missing"
        if found.stat().st_size != expected["bytes"]:
            return f"{name} has {found.stat().st_size} bytes, its manifest {expected['bytes']} (truncated?)"
        if file_sha256(found) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def move_aside(path: Path) -> Path:
    """Rename a bad entry (and its manifest) to ``.<name>.bad-<time>``, out of the cache's way, for inspection."""
    import time

    path = Path(path)
    target = path.with_name(f".{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
    os.replace(path, target)
    manifest_path(path).unlink(missing_ok=True)
    return target
