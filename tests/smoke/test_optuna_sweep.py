"""Tuning with Optuna: ``experiment=tune`` (hydra/sweeper=optuna_resume) runs its trials under debug=fast, each
returning its objective; the same sweep again in its folder resumes the study; ``alignexp.report`` shows the
trials and the best. The sweeps run in this process, through the CLI's Hydra entry point."""

from __future__ import annotations

import json
import math
import sys

import pytest

from alignexp.report.cli import write_report
from alignexp.tuning import Objective, find_studies
from tests.conftest import TINY_RUN

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


@pytest.fixture
def sweep(cache_dir, monkeypatch):
    """``sweep(folder, n_trials)``: ``python -m alignexp.train -m experiment=tune ...`` in this process; Hydra's
    global state is cleared after each (a later in-process run must not look like a job of this sweep)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from alignexp.train import main

    def _sweep(folder, n_trials: int) -> None:
        monkeypatch.setattr(sys, "argv", ["alignexp.train", "-m", "experiment=tune", *TINY_RUN, "train.max_steps=2",
                                          f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={folder}",
                                          f"hydra.sweeper.n_trials={n_trials}",
                                          # Hydra's own logging set up in a test process would write to
                                          # pytest's capture streams after they close
                                          "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
        GlobalHydra.instance().clear()
        try:
            main()
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None

    return _sweep


def check_sweep(sweep, folder, n_trials: int, more: int) -> None:
    """``n_trials`` trials, then the same sweep asked for ``n_trials + more``: resumed, ``more`` new ones run."""
    sweep(folder, n_trials)
    jobs = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    assert jobs == list(range(n_trials))
    objective = Objective(metric="policy.gold_reward", kl_budget=2.0)
    values = [objective.value(json.loads((folder / str(j) / "eval.json").read_text())) for j in jobs]
    assert all(math.isfinite(v) or v == -math.inf for v in values)
    results = (folder / "optimization_results.yaml").read_text()
    assert "train.lr" in results and "loss.beta" in results

    # resumed: the completed trials are the study's, the rest run, numbered after them (a study that did not
    # resume would run n_trials + more new trials into folders 0, 1, ...: jobs.jsonl would say so)
    sweep(folder, n_trials + more)
    n_trials += more
    assert sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) == list(range(n_trials))
    assert len((folder / "jobs.jsonl").read_text().splitlines()) == n_trials

    (study,) = find_studies(folder)
    assert study.params == ["loss.beta", "train.lr"] and study.direction == "maximize"
    assert [t.state for t in study.trials] == ["COMPLETE"] * n_trials
    best = study.best
    assert best.value == max(t.value for t in study.trials)
    report = write_report(folder)
    assert "## Tuning (Optuna)" in report["markdown"]
    assert f"Best trial: #{best.number} (" in report["markdown"]
    assert (folder / "report" / "trials.csv").read_text().count("\n") == n_trials + 1


def test_a_two_trial_study_runs_resumes_and_reports(sweep, tmp_path):
    """In make test: 2 trials, then resumed to 3."""
    check_sweep(sweep, tmp_path / "tune", 2, 1)


@pytest.mark.slow
def test_an_eight_trial_study_runs_resumes_and_reports(sweep, tmp_path):
    """8 trials, then resumed to 10."""
    check_sweep(sweep, tmp_path / "tune", 8, 2)
