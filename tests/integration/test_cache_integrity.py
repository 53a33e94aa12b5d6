"""Caches keyed by the code that made them and verified on read (alignexp/files.py, :func:`shared_cache`):
a change to a module that shapes an entry makes the next run build a new one, and a truncated entry of
each kind (SFT policy, preference data, reference log-probs) is moved aside and rebuilt; the log says why."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest

from alignexp.files import (
    code_digest,
    code_keyed,
    entries_of_other_code,
    register_user_modules,
    verify_entry,
    write_manifest,
)
from alignexp.train import run

KINDS = {"sft": "SFT policy", "preferences": "preference data", "reference": "reference log-probs"}


def entries(cache: Path) -> dict[str, Path]:
    """The one visible entry of each kind in the cache."""
    found = {}
    for kind in KINDS:
        names = [p for p in (cache / kind).iterdir() if not p.name.startswith(".")]
        assert len(names) == 1, names
        found[kind] = names[0]
    return found


def test_a_module_s_source_keys_the_entry(tmp_path, monkeypatch):
    module = tmp_path / "shaping_module.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = code_keyed(tmp_path / "reference" / "abc-def.pt", ("shaping_module",))
    assert first.name.startswith("abc-def.c") and first.suffix == ".pt"
    module.write_text("X = 2\n")
    second = code_keyed(tmp_path / "reference" / "abc-def.pt", ("shaping_module",))
    assert second != first and code_digest(("alignexp.files",)) != code_digest(("alignexp.models.reference",))
    first.parent.mkdir()
    first.write_bytes(b"x")
    assert entries_of_other_code(second) == [first]


def test_the_manifest_catches_truncation_and_a_missing_manifest(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "weights.bin").write_bytes(b"0123456789")
    assert "no manifest" in verify_entry(entry)
    write_manifest(entry)
    assert verify_entry(entry) is None
    (entry / "weights.bin").write_bytes(b"01234")
    assert "has 5 bytes, its manifest 10 (truncated?)" in verify_entry(entry)
    (entry / "weights.bin").write_bytes(b"abcdefghij")
    assert "does not match its checksum" in verify_entry(entry)


def test_runs_rebuild_entries_of_other_code_and_damaged_entries(compose, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "cache"
    user = tmp_path / "user"
    user.mkdir()
    (user / "my_extension.py").write_text("VERSION = 1\n")
    monkeypatch.syspath_prepend(str(user))
    base = [f"paths.cache_dir={cache}", "imports=[my_extension]", "eval.enabled=false"]
    caplog.set_level(logging.INFO)

    run(compose("debug=fast", *base, f"paths.output_dir={tmp_path / 'a'}"))
    first = entries(cache)

    # 1. a truncated entry of each kind is moved aside and rebuilt, the log naming what failed
    (first["sft"] / "model.safetensors").write_bytes((first["sft"] / "model.safetensors").read_bytes()[:100])
    for kind in ("preferences", "reference"):
        first[kind].write_bytes(first[kind].read_bytes()[:50])
    caplog.clear()
    run(compose("debug=fast", *base, f"paths.output_dir={tmp_path / 'b'}"))
    for kind, what in KINDS.items():
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{what}: {first[kind]} failed")]
        assert said and "truncated?" in said[0] and "moved aside to ." in said[0] and "rebuilding" in said[0], kind
        assert verify_entry(first[kind]) is None  # rebuilt whole, under the same name
        assert any(p.name.startswith(f".{first[kind].name}.bad-") for p in first[kind].parent.iterdir())

    # 2. a changed module that shapes one kind of entry: that kind is built anew under another name, and the
    # log says why; the kinds it does not shape are read from the cache
    for kind, shaper in (("reference", "alignexp.models.reference.REFERENCE_CODE"),
                         ("preferences", "alignexp.sampling.samplers.SAMPLING_CODE")):
        module, attribute = shaper.rsplit(".", 1)
        (user / f"shapes_{kind}.py").write_text("VERSION = 1\n")
        monkeypatch.setattr(sys.modules[module], attribute, (*getattr(sys.modules[module], attribute), f"shapes_{kind}"))
    importlib.invalidate_caches()  # the new files, for the path finder that listed the folder before they were
    earlier = entries_with_names(cache)
    run(compose("debug=fast", *base, f"paths.output_dir={tmp_path / 'c'}"))
    before = entries_with_names(cache)
    made = {kind: sorted(before[kind] - earlier[kind]) for kind in KINDS}  # run c's entries: other code than b's
    assert all(len(names) == 1 for kind, names in made.items() if kind != "sft"), made
    (user / "shapes_preferences.py").write_text("VERSION = 2\n")
    caplog.clear()
    run(compose("debug=fast", *base, f"paths.output_dir={tmp_path / 'd'}"))
    said = [r.getMessage() for r in caplog.records]
    assert f"preference data: the cached {made['preferences'][0]} was made by other code (a module that shapes it changed): building " \
           in "\n".join(said)
    assert any(m.startswith("SFT policy: cached at") for m in said)  # not shaped by that module: reused
    (user / "shapes_reference.py").write_text("VERSION = 2\n")
    now = entries_with_names(cache)
    caplog.clear()
    run(compose("debug=fast", *base, f"paths.output_dir={tmp_path / 'e'}"))
    said = "\n".join(r.getMessage() for r in caplog.records)
    newest_reference = max(now["reference"], key=lambda name: (cache / "reference" / name).stat().st_mtime)
    assert f"reference log-probs: the cached {newest_reference} was made by other code" in said
    assert "preference data: read from" in said  # not shaped by that module: reused


def entries_with_names(cache: Path) -> dict[str, set[str]]:
    return {kind: {p.name for p in (cache / kind).iterdir() if not p.name.startswith(".")} for kind in KINDS}


@pytest.fixture(autouse=True)
def _forget_user_modules(monkeypatch):
    import alignexp.files as files

    monkeypatch.setattr(files, "_USER_MODULES", [])
    yield
    register_user_modules([])
