"""Runs of ``python -m alignexp.train`` as real processes (several ranks over gloo on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

FAST = ["debug=fast", "eval.progress=false"]
TWO_CPU_RANKS = ["hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
                 "hardware.threads=1"]


def train(*overrides: str, cache: Path, script: str | None = None, timeout: int = 600,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m alignexp.train <overrides>`` (or ``python <script> <overrides>``) with its own cache,
    one thread per process; fails the test with the output's tail when it exits non-zero."""
    command = [sys.executable, script] if script else [sys.executable, "-m", "alignexp.train"]
    result = subprocess.run([*command, *overrides], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(REPO), "ALIGNEXP_CACHE_DIR": str(cache),
                                 "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **(env or {})})
    return result


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved Hugging Face folder."""
    return load_file(str(folder / "model.safetensors"))


def only_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path
