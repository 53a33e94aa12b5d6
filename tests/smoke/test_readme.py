"""Every `python -m alignexp.train` command the README and docs show composes and validates (sweeps with
their first value), and every module they name is a real entry point."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from alignexp.config import validate
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = sorted({m.group(1).strip() for doc in DOCS for m in re.finditer(
    r"(?:^|\$ |`)(python -m alignexp\.[a-z_]+[^`#\n\\]*)", doc.read_text(), re.M)})
TRAIN = [c for c in COMMANDS if c.startswith("python -m alignexp.train")
         and not re.search(r"<|\.\.\.|\[", c)]  # placeholders are not runnable as written


def test_the_docs_show_commands():
    assert len(TRAIN) >= 8
    assert "python -m alignexp.train loss=ranked_dpo task=tldr model=mistral7b" in COMMANDS


@pytest.mark.parametrize("module", sorted({c.split()[2] for c in COMMANDS}))
def test_named_modules_are_entry_points(module):
    assert hasattr(importlib.import_module(module), "main")


@pytest.mark.parametrize("command", TRAIN)
def test_train_commands_compose_and_validate(compose, command):
    overrides = [a for a in shlex.split(command)[3:] if a != "-m" and not a.startswith("hydra")]
    first_values = [re.sub(r"=([^,{]+),.*$", r"=\1", a) for a in overrides]  # a sweep's first value
    validate(compose(*first_values))


NEEDS_HUB_OR_GPU = re.compile(r"model=\w+7b|task=(?!synthetic)|hardware=(?!cpu)|hydra/launcher=slurm|--config-dir"
                              r"|experiment=imdb")  # the real model's runs: tests/real/
RUNNABLE = [c for c in TRAIN if not NEEDS_HUB_OR_GPU.search(c)]


def test_some_commands_are_runnable_here():
    assert "python -m alignexp.train" in RUNNABLE and len(RUNNABLE) >= 4


@pytest.mark.parametrize("command", RUNNABLE)
def test_commands_that_need_no_hub_or_gpu_run_on_the_fast_settings(compose, command):
    """Each such command (a sweep: its first job) runs end to end with debug=fast added."""
    from pathlib import Path

    from alignexp.train import run

    overrides = [a for a in shlex.split(command)[3:] if a != "-m" and not a.startswith("hydra")]
    first_values = [re.sub(r"=([^,{]+),.*$", r"=\1", a) for a in overrides]
    cfg = compose(*first_values, "debug=fast")
    run(cfg)
    assert (Path(cfg.paths.output_dir) / "eval.json").exists()
