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
