"""Every result records the code and packages that produced it."""

from __future__ import annotations

import subprocess

import torch

from alignexp.provenance import code_commit, package_versions, provenance
from tests.conftest import REPO


def test_the_commit_and_versions_are_those_in_use():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_commit().removesuffix("-dirty") == head
    versions = package_versions()
    assert versions["torch"] == torch.__version__ and "alignexp" in versions and "python" in versions
    record = provenance({"sft_policy": "synthetic-tiny-abc", "preferences": "synthetic-def.jsonl"})
    assert list(record["caches"]) == ["preferences", "sft_policy"] and record["commit"] == code_commit()


def test_eval_json_names_the_code_packages_and_caches_of_the_run(compose):
    import json
    from pathlib import Path

    from alignexp.train import run

    cfg = compose("loss=dpo", "debug=fast")
    run(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "eval.json").read_text())["provenance"]
    assert record["commit"] == code_commit() and record["packages"]["torch"] == torch.__version__
    kinds = sorted(key.split("/")[0] for key in record["caches"])
    assert kinds == ["preferences", "reference", "sft"]  # the SFT policy, its rankings, the reference log-probs
    assert all(Path(path).exists() for path in record["caches"].values())
