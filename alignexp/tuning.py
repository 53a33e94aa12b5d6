"""Tuning with Optuna (``hydra/sweeper=optuna``, the ``tune`` extra): the number a run gives the sweeper, and
the completed trials of a sweep folder (to resume a study, and for ``alignexp.report``).

Each run of a sweep returns its **objective** (``objective.metric``, a dotted key of its eval.json; the gold
reward of the policy on the evaluation prompts by default, which ``task.eval_split=validation`` makes the
held-out validation prompts). With ``objective.kl_budget`` set, a run whose policy KL to the reference
exceeds the budget is infeasible and scores ``-inf``: the study maximises the reward *at* that KL budget.
The sweeper (``hydra_plugins/alignexp_optuna``) resumes a study from its folder: a rerun of the same command
with ``hydra.sweep.dir=<that folder>`` gives Optuna the trials that completed there (their parameters from
each job's overrides, their objective from its eval.json) and runs only the rest, numbered after them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignexp.errors import ConfigError


@dataclass(frozen=True)
class Objective:
    """``objective`` of conf/train.yaml: ``metric`` (a dotted eval.json key) and ``kl_budget`` (None: no budget)."""

    metric: str = "policy.gold_reward"
    kl_budget: float | None = None
    kl_metric: str = "policy.kl"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"objective.metric must be a dotted key of eval.json (e.g. policy.gold_reward), "
                              f"got {self.metric!r}")
        if self.kl_budget is not None and (isinstance(self.kl_budget, bool) or not isinstance(self.kl_budget, (int, float))
                                           or not self.kl_budget >= 0):
            raise ConfigError(f"objective.kl_budget must be a number >= 0 or null, got {self.kl_budget!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> Objective:
        section = dict(section or {})
        unknown = sorted(set(section) - {"metric", "kl_budget", "kl_metric"})
        if unknown:
            raise ConfigError(f"objective.{unknown[0]}: unknown key (objective takes metric, kl_budget, kl_metric)")
        return cls(**section)

    def value(self, record: Mapping[str, Any]) -> float:
        """The objective of one run's eval.json record (``-inf`` where its KL is over the budget)."""
        value = lookup(record, self.metric)
        if self.kl_budget is not None and lookup(record, self.kl_metric) > self.kl_budget:
            return -math.inf
        return value


def objective_for_sweeper(objective: Objective, record: Mapping[str, Any]) -> float | None:
    """What a run returns to Hydra: its objective. Under an Optuna sweeper a missing metric is an error (the
    trial fails, naming the keys eval.json has); elsewhere nothing reads the number, and it is None."""
    try:
        return objective.value(record)
    except ConfigError:
        if _optuna_sweep():
            raise
        return None


def _optuna_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


def lookup(record: Mapping[str, Any], key: str) -> float:
    """``record``'s number at the dotted ``key``; a ConfigError naming the keys there when it is absent."""
    node: Any = record
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(key.split(".")[:i]) or "eval.json"
            have = ", ".join(sorted(node)) if isinstance(node, Mapping) else type(node).__name__
            raise ConfigError(f"objective: eval.json has no '{key}' ({where} holds: {have})")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(f"objective: eval.json's '{key}' is not a number: {node!r}")
    return float(node)


@dataclass
class Trial:
    """One job of a sweep folder: its number, the values of the searched parameters, its state and objective."""

    number: int
    params: dict[str, str]
    state: str
    value: float | None = None
    folder: Path | None = None
    overrides: list[str] = field(default_factory=list)


def job_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.exists() else []


def job_objective(job: Path) -> Objective:
    """The objective a job was run with (its config.yaml's ``objective``; the default where it has none)."""
    path = job / "config.yaml"
    section = (yaml.safe_load(path.read_text()) or {}).get("objective") if path.exists() else None
    return Objective.from_config(section)


def sweep_trials(sweep_dir: str | Path, params: list[str], objective: Objective | None = None) -> list[Trial]:
    """The jobs of a sweep folder (numbered subfolders), each with the values its overrides give ``params``,
    ``COMPLETE`` with its objective (``objective``, else the job's own) where it wrote eval.json, ``FAILED``
    where jobs.jsonl says so, else ``INCOMPLETE`` (interrupted, or running)."""
    sweep_dir = Path(sweep_dir)
    from alignexp.sweeps import job_records

    failed = {job["num"] for job in job_records(sweep_dir)
              if job.get("status") not in ("COMPLETED", None) and isinstance(job.get("num"), int)}
    trials = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides = job_overrides(job)
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        chosen = {p: values[p] for p in params if p in values}
        record = job / "eval.json"
        number = int(job.name)
        if record.exists():
            try:
                value = (objective or job_objective(job)).value(json.loads(record.read_text()))
                trials.append(Trial(number, chosen, "COMPLETE", value, job, overrides))
                continue
            except ConfigError:
                pass
        trials.append(Trial(number, chosen, "FAILED" if number in failed else "INCOMPLETE", None, job, overrides))
    return trials


def best_trial(trials: list[Trial], direction: str = "maximize") -> Trial | None:
    done = [t for t in trials if t.state == "COMPLETE" and t.value is not None and not math.isnan(t.value)]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda t: t.value)


@dataclass
class Study:
    """An Optuna sweep folder: its searched parameters, direction, objective, trials and best trial."""

    folder: Path
    params: list[str]
    direction: str
    objective: Objective
    trials: list[Trial]

    @property
    def best(self) -> Trial | None:
        return best_trial(self.trials, self.direction)


def find_studies(folder: str | Path) -> list[Study]:
    """The Optuna sweeps at or below ``folder``: folders whose numbered jobs ran under an Optuna sweeper
    (their ``.hydra/hydra.yaml``), with the parameters it searched (``hydra.sweeper.params``)."""
    folder = Path(folder)
    studies = []
    candidates = {p.parent for p in folder.rglob("jobs.jsonl")} | {p.parent for p in folder.rglob("optimization_results.yaml")}
    for sweep in sorted(candidates):
        jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        hydra_yaml = next((j / ".hydra" / "hydra.yaml" for j in jobs if (j / ".hydra" / "hydra.yaml").exists()), None)
        if hydra_yaml is None:
            continue
        sweeper = ((yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra") or {}).get("sweeper") or {}
        if "optuna" not in str(sweeper.get("_target_", "")).lower():
            continue
        params = sorted((sweeper.get("params") or {}).keys())
        direction = str(sweeper.get("direction", "minimize")).split(".")[-1].lower()
        objective = job_objective(jobs[0])
        studies.append(Study(sweep, params, direction, objective, sweep_trials(sweep, params)))
    return studies
