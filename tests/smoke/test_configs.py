"""Every YAML under conf/ composes (found by walking the tree, the count asserted), every loss option trains
for a few steps, and every experiment runs a step under debug=fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR, validate
from alignexp.train import run
from tests.conftest import TINY_RUN

CONF = Path(CONF_DIR)
ALL_YAML = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))
# Update this count when a config file is added: the tests below must then compose it too.
EXPECTED_YAML_FILES = 103
ENTRY_CONFIGS = sorted(p for p in ALL_YAML if "/" not in p)
HYDRA_OPTIONS = sorted(p for p in ALL_YAML if p.startswith("hydra/"))
# Parts that are not options of their own: bases other options inherit (task/common/), and the task-specific
# parts of a debug option (debug/task/<debug>_<task>.yaml), composed by the options that use them.
PARTS = sorted(p for p in ALL_YAML if p.startswith(("task/common/", "debug/task/")))
GROUP_OPTIONS = sorted(p for p in ALL_YAML if "/" in p and p not in HYDRA_OPTIONS and p not in PARTS)
LOSS_OPTIONS = sorted(Path(p).stem for p in ALL_YAML if p.startswith("loss/"))
EXPERIMENTS = sorted(p[len("experiment/"):-len(".yaml")] for p in ALL_YAML if p.startswith("experiment/"))


def option(path: str) -> tuple[str, str]:
    """``experiment/frontier/beta.yaml`` -> (``experiment``, ``frontier/beta``)."""
    group, name = path.split("/", 1)
    return group, name[: -len(".yaml")]


def test_every_yaml_is_covered():
    assert len(ALL_YAML) == EXPECTED_YAML_FILES
    assert len(ENTRY_CONFIGS) + len(GROUP_OPTIONS) + len(HYDRA_OPTIONS) + len(PARTS) == len(ALL_YAML)
    assert "train.yaml" in ENTRY_CONFIGS


def test_parts_are_used(compose):
    """The bases and debug parts reach the configs that use them."""
    assert compose("task=tldr").task.max_records is None  # from task/common/records.yaml
    assert compose("debug=fast").task.n_sft == 512  # debug/task/fast_synthetic.yaml
    assert compose("debug=fast", "task=tldr").task.name == "tldr"  # no part for tldr: none applied
    assert compose("model=zephyr7b").model.arch.sliding_window == 4096  # inherited from mistral7b


@pytest.mark.parametrize("name", ENTRY_CONFIGS)
def test_entry_config_composes(compose, name):
    assert compose(config_name=Path(name).stem) is not None


@pytest.mark.parametrize("path", GROUP_OPTIONS)
def test_group_option_composes_and_validates(compose, path):
    skip_without_optuna(path)
    group, name = option(path)
    validate(compose(f"{group}={name}"))


@pytest.mark.parametrize("path", HYDRA_OPTIONS)
def test_hydra_option_composes(compose, path):
    skip_without_optuna(path)
    group, name = path[: -len(".yaml")].rsplit("/", 1)
    cfg = compose(f"{group}={name}", return_hydra_config=True)
    assert cfg.hydra.launcher is not None


@pytest.mark.parametrize("loss", LOSS_OPTIONS)
def test_each_loss_trains_a_few_steps(compose, loss):
    cfg = compose(f"loss={loss}", *TINY_RUN)
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


@pytest.mark.parametrize("option", ["loss.length_normalize=true", "loss.f_divergence=forward_kl",
                                    "loss.f_divergence=js_divergence", "loss.f_divergence=alpha_divergence"])
def test_dpo_options_train_a_few_steps(compose, option):
    """DPO's rows of the methods table that are options, not files: length-normalised DPO and f-DPO."""
    cfg = compose("loss=dpo", option, *TINY_RUN)
    record = run(cfg)
    assert record["hparams"][option.split("=")[0].split(".")[1]] == OmegaConf.select(cfg, option.split("=")[0])


def sweep_first_values(cfg) -> list[str]:
    """A sweep experiment's first job: the first value of each of its ``hydra.sweeper.params``; a parameter an
    Optuna sweeper searches over a distribution (``interval(...)``, ``tag(log, ...)``) keeps its config value."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    return [f"{key}={str(values).split(',')[0].strip()}" for key, values in params.items()
            if "interval(" not in str(values) and not str(values).startswith("tag(")]


# Options that extend hydra-optuna-sweeper's config (the `tune` extra): composed where it is installed.
NEEDS_OPTUNA = ("hydra/sweeper/optuna_resume.yaml", "experiment/tune.yaml")


def skip_without_optuna(path: str) -> None:
    if path in NEEDS_OPTUNA:
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the tune extra is not installed")


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.startswith("imdb/")])  # tests/real/
def test_each_experiment_runs_a_step(compose, experiment):
    skip_without_optuna(f"experiment/{experiment}.yaml")
    first = sweep_first_values(compose(f"experiment={experiment}", return_hydra_config=True))
    cfg = compose(f"experiment={experiment}", *first, *TINY_RUN)
    record = run(cfg)
    assert (Path(cfg.paths.output_dir) / "eval.json").exists() and record["task"] == "synthetic"
