"""What a report says about what it summarises: a sweep run under ``debug=fast`` is flagged as such and its
runs are not compared unless asked; "swept" names every key that varies, the loss and the seed included;
an interval of a proportion never leaves [0, 1]. The run folders are laid out as Hydra writes them
(eval.json, config.yaml, .hydra/{overrides,hydra}.yaml)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from alignexp.metrics.seeds import proportion_t_interval, t_interval
from alignexp.report import main, write_report

# (loss, seed) -> win rate; close to 1, so that mean + t s / sqrt(n) passes 1 on 2 seeds
WINS = {("dpo", 1): 0.96, ("dpo", 2): 1.0, ("ipo", 1): 0.90, ("ipo", 2): 0.99}


def write_sweep(root: Path, debug: str | None) -> Path:
    for job, ((loss, seed), win) in enumerate(WINS.items()):
        folder = root / str(job)
        (folder / ".hydra").mkdir(parents=True)
        overrides = ([f"debug={debug}"] if debug else []) + [f"loss={loss}", f"seed={seed}"]
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        choices = {"model": "tiny", "task": "synthetic", "loss": loss, "debug": debug}
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
        (folder / "config.yaml").write_text(yaml.safe_dump({"loss": {"name": loss, "beta": 0.1}, "seed": seed,
                                                            "sampler": {"name": "offline"}}))
        section = {"gold_reward": 0.3 + 0.01 * seed, "gold_reward_stderr": 0.02, "kl": 1.0 + seed, "kl_stderr": 0.1}
        record = {"task": "synthetic", "loss": loss, "model": "tiny", "n_prompts": 16, "policy": section,
                  "reference": {"gold_reward": 0.1, "kl": 0.0},
                  "comparisons": {"win_rate_vs_reference": win, "win_rate_vs_reference_stderr": 0.01,
                                  "judge": "gold", "baseline": "reference_samples"},
                  "by_temperature": {"1": {"comparisons": {"win_rate_vs_reference": win}}}}
        (folder / "eval.json").write_text(json.dumps(record))
    return root


def test_proportion_interval_stays_in_the_unit_interval():
    """(0.95, 0.99, 1.00): mean 0.98, stderr 0.015275, t(0.975, 2) = 4.302653, so the t-interval is
    0.98 ± 0.065724 = [0.914276, 1.045724]; as a proportion's, [0.914276, 1]."""
    plain, kept = t_interval([0.95, 0.99, 1.0]), proportion_t_interval([0.95, 0.99, 1.0])
    assert plain.high == pytest.approx(1.045724, abs=1e-6) and plain.low == pytest.approx(0.914276, abs=1e-6)
    assert (kept.mean, kept.low, kept.high) == (pytest.approx(0.98), pytest.approx(0.914276, abs=1e-6), 1.0)
    assert proportion_t_interval([0.0, 0.02]).low == 0.0  # 0.01 ± 12.706 x 0.01: cut at 0
    assert proportion_t_interval([0.4, 0.5, 0.6]) == t_interval([0.4, 0.5, 0.6])  # inside: unchanged


def test_a_debug_sweep_is_flagged_lists_loss_and_seed_and_keeps_proportions_in_bounds(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep", debug="fast")
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "seeds: 1 2; swept: loss, seed." in printed
    assert "**A DEBUG SWEEP**: every run ran under debug=fast" in printed
    assert "(not made: the runs ran under debug=" in printed and "| ipo - dpo |" not in printed
    assert printed.rstrip().splitlines()[-1].endswith(".png") and "DEBUG runs (debug=): not results" in printed
    # dpo's win rates 0.96, 1.0: s = 0.028284, stderr 0.02, t(0.975, 1) = 12.706205: the t-interval
    # 0.98 ± 0.254124 = [0.725876, 1.234124] runs past 1; cut at 1 here
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "report" / "results.csv").open())}
    assert float(rows["dpo"]["win_rate_ci_high"]) == 1.0
    assert float(rows["dpo"]["win_rate_ci_low"]) == pytest.approx(0.725876, abs=1e-5)
    for row in rows.values():
        assert 0.0 <= float(row["win_rate_ci_low"]) <= float(row["win_rate_ci_high"]) <= 1.0
    assert "| 0.980 [0.726, 1.000] |" in printed
    # asked for, the comparisons are made
    written = write_report(sweep, tmp_path / "asked", allow_debug=True)
    assert any(c for c in written["comparisons"]) and "| ipo - dpo |" in written["markdown"]
    assert written["debug"] and "A DEBUG SWEEP" in written["markdown"]


def test_real_runs_are_not_flagged_and_a_mixed_folder_compares_only_the_real_ones(tmp_path):
    real = write_report(write_sweep(tmp_path / "real", debug=None), tmp_path / "out")
    assert not real["debug"] and "DEBUG" not in real["markdown"] and "| ipo - dpo |" in real["markdown"]
    write_sweep(tmp_path / "mixed" / "real", debug=None)
    write_sweep(tmp_path / "mixed" / "debug", debug="fast")
    mixed = write_report(tmp_path / "mixed", tmp_path / "out2")
    assert "**DEBUG RUNS INCLUDED**: 4 of 8 runs ran under debug=fast" in mixed["markdown"]
    # made over the real runs only: the same comparisons, on the same values, as the real folder alone gives
    assert [(c.quantity, c.test) for c in mixed["comparisons"]] == [(c.quantity, c.test) for c in real["comparisons"]]
