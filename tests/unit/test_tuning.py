"""The objective a run returns to an Optuna sweep, and a sweep folder's trials read back (resume, report)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from alignexp.errors import ConfigError
from alignexp.tuning import Objective, best_trial, sweep_trials

RECORD = {"policy": {"gold_reward": 0.4, "kl": 1.5}, "reference": {"gold_reward": 0.1, "kl": 0.0}}


def test_objective_reads_a_dotted_key_within_the_kl_budget():
    assert Objective().value(RECORD) == 0.4
    assert Objective(metric="reference.gold_reward").value(RECORD) == 0.1
    assert Objective(kl_budget=2.0).value(RECORD) == 0.4
    assert Objective(kl_budget=1.0).value(RECORD) == -math.inf  # over the budget: infeasible


@pytest.mark.parametrize("section, message", [
    ({"metric": ""}, "objective.metric must be a dotted key"),
    ({"kl_budget": -1}, "objective.kl_budget must be a number >= 0"),
    ({"metrik": "policy.kl"}, "objective.metrik: unknown key"),
])
def test_objective_settings_are_checked(section, message):
    with pytest.raises(ConfigError, match=message):
        Objective.from_config(section)


def test_a_missing_metric_names_what_eval_json_has():
    with pytest.raises(ConfigError, match=r"eval.json has no 'policy.win_rate' \(policy holds: gold_reward, kl\)"):
        Objective(metric="policy.win_rate").value(RECORD)


def job(folder, number, overrides, record=None, objective=None):
    path = folder / str(number)
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if objective is not None:
        (path / "config.yaml").write_text(yaml.safe_dump({"objective": objective}))
    if record is not None:
        (path / "eval.json").write_text(json.dumps(record))


def test_sweep_trials_read_back_params_states_and_objectives(tmp_path):
    """Job 0 completed, job 1 failed (jobs.jsonl), job 2 interrupted (no eval.json), job 3 over its KL budget."""
    job(tmp_path, 0, ["train.lr=0.001", "loss.beta=0.1", "debug=fast"], RECORD)
    job(tmp_path, 1, ["train.lr=0.0001", "loss.beta=0.2"])
    job(tmp_path, 2, ["train.lr=0.0003", "loss.beta=0.3"])
    job(tmp_path, 3, ["train.lr=0.01", "loss.beta=0.5"], {"policy": {"gold_reward": 0.9, "kl": 9.0}},
        objective={"metric": "policy.gold_reward", "kl_budget": 2.0})
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"num": 0, "status": "COMPLETED"}) + "\n"
                                         + json.dumps({"num": 1, "status": "FAILED"}) + "\n")
    trials = sweep_trials(tmp_path, ["loss.beta", "train.lr"])
    assert [(t.number, t.state) for t in trials] == [(0, "COMPLETE"), (1, "FAILED"), (2, "INCOMPLETE"),
                                                     (3, "COMPLETE")]
    assert trials[0].params == {"loss.beta": "0.1", "train.lr": "0.001"} and trials[0].value == 0.4
    assert trials[3].value == -math.inf
    assert best_trial(trials).number == 0
    assert best_trial(trials, "minimize").number == 3
    assert best_trial(trials[1:3]) is None
