"""Tuning with Optuna: ``experiment=tune`` (hydra/sweeper=optuna_resume) runs its trials under debug=fast, each
returning its objective; a rerun in the same folder resumes the study; ``alignexp.report`` shows the trials
and the best."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from alignexp.report.cli import write_report
from alignexp.tuning import Objective, find_studies
from tests.conftest import REPO, TINY_RUN

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def sweep(cache_dir, folder, n_trials: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "alignexp.train", "-m", "experiment=tune", *TINY_RUN, "train.max_steps=2",
               f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={folder}", f"hydra.sweeper.n_trials={n_trials}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_sweep(cache_dir, tmp_path, n_trials: int, more: int) -> None:
    """``n_trials`` trials, then the same sweep asked for ``n_trials + more``: resumed, ``more`` new ones run."""
    folder = tmp_path / "tune"
    first = sweep(cache_dir, folder, n_trials)
    assert "Best value" in first.stderr + first.stdout
    jobs = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    assert jobs == list(range(n_trials))
    objective = Objective(metric="policy.gold_reward", kl_budget=2.0)
    values = [objective.value(json.loads((folder / str(j) / "eval.json").read_text())) for j in jobs]
    assert all(math.isfinite(v) or v == -math.inf for v in values)
    results = (folder / "optimization_results.yaml").read_text()
    assert "train.lr" in results and "loss.beta" in results

    # resumed: the completed trials are the study's, the rest run, numbered after them
    again = sweep(cache_dir, folder, n_trials + more)
    assert f"resuming study 'dpo' from {folder}: {n_trials} completed trials, {more} to run" in again.stderr + again.stdout
    n_trials += more
    assert sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) == list(range(n_trials))

    (study,) = find_studies(folder)
    assert study.params == ["loss.beta", "train.lr"] and study.direction == "maximize"
    assert [t.state for t in study.trials] == ["COMPLETE"] * n_trials
    best = study.best
    assert best.value == max(t.value for t in study.trials)
    report = write_report(folder)
    assert "## Tuning (Optuna)" in report["markdown"]
    assert f"Best trial: #{best.number} (" in report["markdown"]
    assert (folder / "report" / "trials.csv").read_text().count("\n") == n_trials + 1


def test_a_two_trial_study_runs_resumes_and_reports(cache_dir, tmp_path):
    """In make test: 2 trials; the rerun finds both completed and runs none (a resume at the cost of a start)."""
    check_sweep(cache_dir, tmp_path, 2, 0)


@pytest.mark.slow
def test_an_eight_trial_study_runs_resumes_and_reports(cache_dir, tmp_path):
    """8 trials (about a minute on 2 loaded cores), then resumed to 9."""
    check_sweep(cache_dir, tmp_path, 8, 1)
