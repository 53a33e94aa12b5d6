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
