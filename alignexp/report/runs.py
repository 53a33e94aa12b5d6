"""Runs: the folders below a report's FOLDER that hold an eval.json, with their config, command-line
overrides, method, seed and the hyper-parameters that differ between them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignexp.evaluation.results import HEADLINE_METRICS

# Hyper-parameters that are not an experiment's subject: left out of "swept" even where they differ.
IGNORED_PREFIXES = ("paths.", "hydra.", "logger.", "hardware.", "eval.", "export.", "agreement.", "prompting.",
                    "benchmarks.")
# loss and sampler choices are the "method" column; the seed makes replicates, never a hyper-parameter.
SEED_KEY = "seed"
IGNORED_KEYS = {"policy", "reference", "mode", "init_from", "model.path", "loss", "loss.name", "sampler",
                "sampler.name", "run_name", "experiment", SEED_KEY}

# The headline metrics a table shows, in order, where at least one run has them: (column, section, key).
METRICS = HEADLINE_METRICS
PLOTTED_PARAM_ORDER = ("loss.beta", "loss.margin", "task.ranking_length")
# eval.json keys that are proportions (in [0, 1]): their intervals over seeds are kept inside [0, 1].
PROPORTION_KEYS = frozenset({"win_rate_vs_reference", "win_rate_vs_reference_lc", "win_rate_vs_dataset",
                             "preference_accuracy", "truncated_fraction"})


@dataclass
class Run:
    """One run folder: its eval.json, flattened config and command-line overrides."""

    path: Path
    name: str
    record: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)  # Hydra's config-group choices (.hydra/hydra.yaml)

    @property
    def method(self) -> str:
        """The loss, with the sampler where it is not ``offline``; ``best_of_n`` for that baseline; a
        baseline that names itself in eval.json (``2-shot prompting``) by that name; a run named by an
        experiment (``run_name``: ``rso``, a study's arm) by that name."""
        if isinstance(self.record.get("method"), str):
            return self.record["method"]
        sampler = self.config.get("sampler.name")
        if sampler == "best_of_n":
            return "best_of_n"
        loss = self.record.get("loss") or self.config.get("loss.name") or "?"
        run_name = self.config.get("run_name")
        if run_name and run_name not in (loss, self.config.get("loss.name")):
            return str(run_name)
        return f"{loss} ({sampler})" if sampler not in (None, "offline") else str(loss)

    @property
    def seed(self) -> Any:
        """The run's ``seed`` (config, else command line); None where neither has one."""
        return value_of(self, SEED_KEY)

    @property
    def best_of_n(self) -> dict[str, Any] | None:
        """A ``sampler=best_of_n`` run's own entry of eval.json's ``best_of_n`` (its N; else the largest)."""
        entries = self.record.get("best_of_n") or []
        if self.config.get("sampler.name") != "best_of_n" or not entries:
            return None
        n = self.config.get("sampler.n")
        return next((e for e in entries if e.get("n") == n), max(entries, key=lambda e: e.get("n", 0)))

    @property
    def short_name(self) -> str:
        """The name for a table cell: a Hydra sweep job ``<num>_<overrides>`` becomes ``<parent>/#<num>``."""
        parts = list(Path(self.name).parts) if self.name else [self.path.name]
        for i, part in enumerate(parts):  # an override value with "/" nests the job folder: cut there
            number, sep, rest = part.partition("_")
            if sep and number.isdigit() and "=" in rest:
                parts = parts[:i] + [f"#{number}"]
                break
        short = "/".join(parts)
        return short if len(short) <= 48 else "..." + short[-45:]

    @property
    def debug(self) -> str | None:
        """The ``debug`` option the run was composed with (``fast``: a few steps on little data, for tests and a
        first look, not a result), from Hydra's group choices or the command line; None for a real run."""
        value = self.choices.get("debug", self.overrides.get("debug", self.record.get("debug")))
        return None if value in (None, "", "null", "None") else str(value)

    @property
    def is_baseline(self) -> bool:
        """A prompting baseline (eval.json's ``prompting``): measured as a policy is, without a KL."""
        return isinstance(self.record.get("prompting"), dict)

    @property
    def benchmarks_only(self) -> bool:
        """An eval.json of ``mode=benchmarks``: benchmark scores and no headline metric."""
        return bool(self.record.get("benchmarks")) and not any(self.metric(s, k)[0] is not None
                                                               for _, s, k in METRICS)

    def metric(self, section: str, key: str) -> tuple[float | None, float | None]:
        """(value, stderr) of a metric; a best-of-N run's policy reward and KL are its best-of-N's."""
        values = self.record.get(section) or {}
        if section == "policy" and key in ("gold_reward", "judge_score", "kl") and self.best_of_n is not None:
            values = self.best_of_n
        value, stderr = values.get(key), values.get(f"{key}_stderr")
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return number, (stderr if isinstance(stderr, (int, float)) else None)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"beta": 0.1}}`` -> ``{"loss.beta": 0.1}`` (lists kept as values)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None


def _overrides(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    items = _read_yaml(path) or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of key=value overrides")
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def find_runs(folder: str | Path) -> list[Run]:
    """Every folder at or below ``folder`` that holds an eval.json, sorted by path (numbers in numeric order)."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    paths = [root / "eval.json"] if (root / "eval.json").is_file() else []
    paths += sorted((p for p in root.rglob("eval.json") if p.parent != root), key=_natural)
    runs = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("policy"), dict):
            raise ValueError(f"{path}: not an eval.json (expected an object with a 'policy' field)")
        run = path.parent
        config_path = run / "config.yaml" if (run / "config.yaml").exists() else run / ".hydra" / "config.yaml"
        config = flatten(_read_yaml(config_path) or {}) if config_path.exists() else {}
        for key, value in (record.get("hparams") or {}).items():  # the loss's, as eval.json records them
            config.setdefault(f"loss.{key}", value)
        name = run.relative_to(root).as_posix() if run != root else run.name
        runs.append(Run(run, name, record, config, _overrides(run / ".hydra" / "overrides.yaml"),
                        _choices(run / ".hydra" / "hydra.yaml")))
    return runs


def _choices(path: Path) -> dict[str, Any]:
    """Hydra's config-group choices of a run (``{"debug": "fast", "loss": "dpo", ...}``); {} without the file."""
    if not path.exists():
        return {}
    hydra = (_read_yaml(path) or {}).get("hydra") or {}
    return dict((hydra.get("runtime") or {}).get("choices") or {})


def _natural(path: Path) -> list:
    """A sort key that puts Hydra's job folders in numeric order (2 before 10)."""
    return [[(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part)] for part in path.parts]


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith("._target_")


def parse_value(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def swept_parameters(runs: Sequence[Run]) -> list[str]:
    """Config keys (and override keys) whose values differ between runs; for one run, its overrides.
    ``seed`` is never one: runs that differ only by it are replicates of one point. Prompting baselines
    are left out where trained runs are present (their evaluation config differs from training's in keys
    that are no experiment's subject)."""
    runs = [r for r in runs if not r.is_baseline] or list(runs)
    if len(runs) == 1:
        return sorted(k for k in runs[0].overrides if not _ignored(k))
    keys = sorted({k for r in runs for k in (*r.config, *r.overrides) if not _ignored(k)})
    swept = []
    for key in keys:  # a key only some runs have (a method's own hyper-parameter) counts where it varies
        values = {json.dumps(value_of(r, key), sort_keys=True, default=str) for r in runs
                  if key in r.config or key in r.overrides}
        if len(values) > 1:
            swept.append(key)
    return swept


def varied_keys(runs: Sequence[Run], params: Sequence[str]) -> list[str]:
    """Everything that differs between the runs, for the report's "swept" line: the method (``loss``, and
    ``sampler`` or ``run_name`` where those differ), ``seed``, then the swept hyper-parameters ``params``."""
    runs = [r for r in runs if not r.is_baseline] or list(runs)
    varied = []
    for key, value in (("loss", lambda r: r.config.get("loss.name", r.record.get("loss"))),
                       ("sampler", lambda r: r.config.get("sampler.name")), ("run_name", lambda r: r.method),
                       ("seed", lambda r: r.seed)):
        if len({json.dumps(value(r), sort_keys=True, default=str) for r in runs}) > 1:
            varied.append(key)
    if "loss" in varied or "sampler" in varied:  # the method's name follows from them
        varied = [k for k in varied if k != "run_name"]
    return varied + [p for p in params if p not in varied]


def value_of(run: Run, key: str) -> Any:
    """The run's value of config key ``key``: its config.yaml, else its command-line override, else None."""
    if key in run.config:
        return run.config[key]
    return parse_value(run.overrides[key]) if key in run.overrides else None


def numeric(value: Any) -> float | None:
    """``value`` as a float where it is a number (or a string that parses as one), else None."""
    value = parse_value(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def reward_key(runs: Sequence[Run]) -> tuple[str, str] | None:
    """The reward the frontier plots, as (eval.json key, label): the gold reward where a run has it, else
    the judge's score; None where no run has either."""
    for key, label in (("gold_reward", "gold reward"), ("judge_score", "judge score")):
        if any(r.metric("policy", key)[0] is not None for r in runs):
            return key, label
    return None


def seed_order(value: Any) -> tuple:
    """A sort key for seeds and hyper-parameter values of any type (numbers in numeric order, None last)."""
    number = numeric(value)
    return (value is None, number is None, number if number is not None else 0.0, str(value))
