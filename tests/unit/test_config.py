"""Bad overrides fail when the config is composed, with a message that names the key."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from alignexp.config import ConfigError, validate
from tests.conftest import REPO


@pytest.mark.parametrize("override, key", [
    ("loss.beta=-1", "loss.beta"),
    ("loss=dpo loss.label_smoothing=0.7", "loss.label_smoothing"),
    ("+loss.not_a_knob=1", "not_a_knob"),
    ("pairs=sideways", "pairs"),
    ("train.lr=0", "train.lr"),
    ("task.ranking_length=1", "task.ranking_length"),
    ("+model.not_a_field=1", "model.not_a_field"),
    ("train.reference=sometimes", "train.reference"),
    ("eval.temperatures=[-1.0]", "eval.temperatures"),
    ("loss.name=nonexistent", "loss.name"),
])
def test_bad_values_name_the_key(compose, override, key):
    cfg = compose(*override.split())
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert key in str(info.value)


def test_a_loss_with_a_config_but_no_registration_suggests_imports(compose, tmp_path):
    """A user's conf/loss/my_loss.yaml composed (Hydra found it), but the module with @register_loss is not
    imported: the error says to add it to imports=."""
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "my_loss.yaml").write_text("name: my_loss\nbeta: 0.1\n")
    cfg = compose("loss=my_loss", f"hydra.searchpath=[file://{tmp_path}]")
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith("loss.name: unknown loss 'my_loss'") and "add imports=[<your module>]" in message
    assert '@register_loss("my_loss")' in message


def test_a_target_that_cannot_be_imported_suggests_imports(compose):
    from alignexp.config import build_task

    cfg = compose("task._target_=my_tasks.MyTask")
    with pytest.raises(ConfigError) as info:
        build_task(validate(cfg).task)
    assert "task._target_=my_tasks.MyTask must be importable: add it to imports=[...]" in str(info.value)


def test_missing_required_value_is_named(compose):
    cfg = compose("init_from=???")
    with pytest.raises(ConfigError, match="init_from"):
        validate(cfg)


def test_default_config_is_valid(compose):
    validate(compose())


def test_cli_fails_in_the_first_seconds_with_the_key():
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "alignexp.train", "loss.beta=-1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "loss.beta must be > 0, got -1" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - start < 60


def test_unknown_option_of_a_group_is_refused_by_hydra():
    result = subprocess.run([sys.executable, "-m", "alignexp.train", "loss=nonexistent"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "nonexistent" in result.stderr and "loss" in result.stderr


def test_the_users_command_fails_fast_offline_and_says_how_to_fix_it():
    """`python -m alignexp.train loss=ranked_dpo task=tldr model=mistral7b` with no network or local copy."""
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "alignexp.train", "loss=ranked_dpo", "task=tldr",
                             "model=mistral7b", "hydra.run.dir=/tmp/alignexp-offline-check"], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    elapsed = time.time() - start
    assert result.returncode == 1
    assert "model.path=mistralai/Mistral-7B-v0.1" in result.stderr and "model.path=/some/folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 90  # dominated by importing torch and transformers on 2 busy cores


def test_likely_mistakes_are_warned_with_the_key_that_fixes_them(compose):
    """task=custom on one file with the tiny model's random weights: two warnings, each naming its fix; the
    default experiment (the synthetic task trains its own SFT policy) has none."""
    from alignexp.config import build_task
    from alignexp.preflight import setup_warnings

    data = REPO / "tests" / "fixtures" / "custom" / "pref_standard.jsonl"
    args = validate(compose("task=custom", f"task.path={data}", "loss=dpo"))
    warnings = setup_warnings(args, build_task(args.task))
    assert len(warnings) == 2
    assert warnings[0].startswith("model=tiny has no weights") and "Set model.path=" in warnings[0]
    assert warnings[1].startswith(f"task.eval_path=null: evaluation reads task.path={data}, the training data")
    args = validate(compose())
    assert setup_warnings(args, build_task(args.task)) == []
