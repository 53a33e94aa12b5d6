"""Every YAML under conf/ composes (found by walking the tree, the count asserted), and every loss
option trains for a few steps on the tiny synthetic run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignexp.config import CONF_DIR, validate
from alignexp.train import run
from tests.conftest import TINY_RUN

CONF = Path(CONF_DIR)
ALL_YAML = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))
# Update this count when a config file is added: the tests below must then compose it too.
EXPECTED_YAML_FILES = 49
ENTRY_CONFIGS = sorted(p for p in ALL_YAML if "/" not in p)
GROUP_OPTIONS = sorted(p for p in ALL_YAML if "/" in p and not p.startswith("hydra/"))
HYDRA_OPTIONS = sorted(p for p in ALL_YAML if p.startswith("hydra/"))
# Losses whose defaults outgrow the tiny run get a few extra overrides.
LOSS_SMOKE_OVERRIDES = {"ppo": ["ppo.steps=2", "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1"]}
LOSS_OPTIONS = sorted(Path(p).stem for p in ALL_YAML if p.startswith("loss/"))


def test_every_yaml_is_covered():
    assert len(ALL_YAML) == EXPECTED_YAML_FILES
    assert len(ENTRY_CONFIGS) + len(GROUP_OPTIONS) + len(HYDRA_OPTIONS) == len(ALL_YAML)
    assert "train.yaml" in ENTRY_CONFIGS


@pytest.mark.parametrize("name", ENTRY_CONFIGS)
def test_entry_config_composes(compose, name):
    assert compose(config_name=Path(name).stem) is not None


# Groups that belong to another entry config than train.yaml.
GROUP_ENTRY = {"judge": "sample"}


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_group_option_composes_and_validates(compose, option):
    group, name = option.rsplit("/", 1)
    entry = GROUP_ENTRY.get(group, "train")
    cfg = compose(f"{group}={Path(name).stem}", config_name=entry)
    validate(cfg)


@pytest.mark.parametrize("option", HYDRA_OPTIONS)
def test_hydra_option_composes(compose, option):
    group, name = option.rsplit("/", 1)
    cfg = compose(f"{group}={Path(name).stem}", return_hydra_config=True)
    assert cfg.hydra.launcher is not None


@pytest.mark.parametrize("loss", LOSS_OPTIONS)
def test_each_loss_trains_a_few_steps(compose, loss, tmp_path):
    extra = LOSS_SMOKE_OVERRIDES.get(loss, [])
    cfg = compose(f"loss={loss}", *TINY_RUN, *extra)
    validate(cfg)
    record = run(cfg)
    assert record["loss"] == cfg.loss.name
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "eval.json").read_text())
    if cfg.loss.name == "reward":  # a reward model, measured on held-out rankings
        assert (out / "reward_model" / "config.json").exists()
        assert 0.0 <= saved["reward_model"]["heldout_accuracy"] <= 1.0
    else:
        assert saved["n_prompts"] == 16
        assert (out / "policy" / "config.json").exists()
