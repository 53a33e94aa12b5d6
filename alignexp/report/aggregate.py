"""From runs to comparisons: replicates (runs that differ only by ``seed``) grouped into points with
t-intervals over seeds, each method's reward/KL frontier, reward at matched KL, and paired tests.

The statistics themselves are in :mod:`alignexp.metrics.seeds`; docs/statistics.md explains the choices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignexp.metrics.seeds import (
    Interval,
    PairedTest,
    bootstrap_mean_band,
    interpolate,
    paired_t_test,
    proportion_t_interval,
    t_interval,
)
from alignexp.report.runs import METRICS, PROPORTION_KEYS, Run, seed_order, value_of

LEVEL = 0.95
NAN = float("nan")
DEFAULT_BASELINE = "dpo"
NOT_COMPARED = ("response_tokens", "ter")  # descriptive metrics, not outcomes to test


@dataclass
class Point:
    """One configuration (method, task and swept hyper-parameters) and its runs, one per seed."""

    method: str
    task: str
    params: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[Any]:
        return sorted({r.seed for r in self.runs}, key=seed_order)

    def by_seed(self, section: str, key: str) -> dict[Any, float]:
        """The metric of each seed (the mean of its runs where one seed was run more than once)."""
        values: dict[Any, list[float]] = {}
        for run in self.runs:
            value = run.metric(section, key)[0]
            if value is not None:
                values.setdefault(run.seed, []).append(value)
        return {seed: sum(v) / len(v) for seed, v in values.items()}

    def summary(self, section: str, key: str) -> Interval | None:
        """Mean and 95% t-interval over the runs (kept inside [0, 1] for a proportion); for a single run, its
        value and its own stderr (over prompts) with no interval. None where no run has the metric."""
        values = [v for v, _ in (r.metric(section, key) for r in self.runs) if v is not None]
        if not values:
            return None
        if len(values) == 1:
            stderr = next(s for v, s in (r.metric(section, key) for r in self.runs) if v is not None)
            return Interval(values[0], NAN, NAN, 1, NAN if stderr is None else stderr)
        return interval_over_seeds(key, values)

    def describe(self, params: Sequence[str] | None = None) -> str:
        """``beta=0.1, ranking_length=4``: the swept values, short names, unset ones left out."""
        keys = [k for k in (params or self.params) if not (self.method == "best_of_n" and k.startswith("loss."))]
        return ", ".join(f"{k.split('.')[-1]}={self.params[k]}" for k in keys if self.params.get(k) is not None)


def interval_over_seeds(key: str, values: Sequence[float]) -> Interval:
    """The mean of one metric over replicate runs with its 95% t-interval, cut to [0, 1] where the metric
    (an eval.json key) is a proportion."""
    return (proportion_t_interval if key in PROPORTION_KEYS else t_interval)(values, LEVEL)


def group_points(runs: Sequence[Run], params: Sequence[str]) -> list[Point]:
    """Runs grouped by (task, method, values of ``params``): the seeds of one configuration become one
    point. Sorted by task, method and the parameters' values (numbers in numeric order)."""
    points: dict[str, Point] = {}
    for run in runs:
        values = {k: value_of(run, k) for k in params}
        task = str(run.record.get("task", "-"))
        key = json.dumps([task, run.method, [values[k] for k in params]], sort_keys=True, default=str)
        points.setdefault(key, Point(run.method, task, values)).runs.append(run)
    return sorted(points.values(), key=lambda p: (p.task, p.method, [seed_order(p.params[k]) for k in params]))


@dataclass
class Frontier:
    """A method's reward/KL frontier: for each seed, the piecewise-linear curve through its runs' (KL,
    reward) points sorted by KL. It is defined on the KL range every seed covers, [low, high], and the
    method's curve there is the mean over seeds of the per-seed curves."""

    task: str
    method: str
    curves: dict[Any, list[tuple[float, float]]]

    @property
    def seeds(self) -> list[Any]:
        return sorted(self.curves, key=seed_order)

    @property
    def low(self) -> float:
        return max(min(kl for kl, _ in points) for points in self.curves.values())

    @property
    def high(self) -> float:
        return min(max(kl for kl, _ in points) for points in self.curves.values())

    @property
    def has_range(self) -> bool:
        """Whether every seed has runs at two or more KLs and their ranges overlap."""
        return self.low < self.high

    def by_seed(self, kl: float) -> dict[Any, float] | None:
        """Each seed's reward at ``kl``, interpolated on its curve; None outside [low, high]."""
        if not self.has_range or not self.low <= kl <= self.high:
            return None
        values = {seed: interpolate([k for k, _ in pts], [v for _, v in pts], kl) for seed, pts in self.curves.items()}
        return {seed: v for seed, v in values.items() if v is not None}

    def at(self, kl: float) -> Interval | None:
        """The reward at matched KL ``kl``: mean over seeds with its t-interval; None outside the range."""
        values = self.by_seed(kl)
        if values is None:
            return None
        ordered = [values[s] for s in self.seeds]
        return t_interval(ordered, LEVEL) if len(ordered) > 1 else Interval(ordered[0], NAN, NAN, 1)

    def band(self, n_grid: int = 60, n_resamples: int = 2000) -> tuple[list[float], list[float], list[float], list[float]]:
        """(KL grid over [low, high], mean curve, bootstrap band low, high): a percentile bootstrap over
        seeds of the mean of the per-seed curves (:func:`alignexp.metrics.seeds.bootstrap_mean_band`).
        With one seed the band is the curve itself."""
        if not self.has_range:
            return [], [], [], []
        grid = [self.low + (self.high - self.low) * i / (n_grid - 1) for i in range(n_grid - 1)] + [self.high]
        curves = [[self.by_seed(kl)[seed] for kl in grid] for seed in self.seeds]
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n_grid)]
        low, high = bootstrap_mean_band(curves, n_resamples=n_resamples, level=LEVEL) if len(curves) > 1 else (mean, mean)
        return grid, mean, low, high


def frontiers(runs: Sequence[Run], reward: str) -> list[Frontier]:
    """One frontier per (task, method) over its runs that have both a KL and ``reward``."""
    curves: dict[tuple[str, str], dict[Any, list[tuple[float, float]]]] = {}
    for run in runs:
        kl, value = run.metric("policy", "kl")[0], run.metric("policy", reward)[0]
        if kl is not None and value is not None:
            key = (str(run.record.get("task", "-")), run.method)
            curves.setdefault(key, {}).setdefault(run.seed, []).append((kl, value))
    return [Frontier(task, method, per_seed) for (task, method), per_seed in sorted(curves.items())]


def default_kl_points(fronts: Sequence[Frontier]) -> list[float]:
    """Where to compare when the user names no KL: three points (1/4, 1/2, 3/4 of the way, two significant
    digits) across the KL range that every method's frontier covers; none when they share no range."""
    ranged = [f for f in fronts if f.has_range]
    if not ranged:
        return []
    low, high = max(f.low for f in ranged), min(f.high for f in ranged)
    if low >= high:
        return []
    points = {_significant(low + (high - low) * q, 2) for q in (0.25, 0.5, 0.75)}
    return sorted(p for p in points if low <= p <= high)


def _significant(x: float, digits: int) -> float:
    return 0.0 if x == 0 else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def comparison_pairs(methods: Sequence[str], compare: Sequence[str] | None = None,
                     baseline: str | None = None) -> list[tuple[str, str]]:
    """The (first, second) method pairs to compare, the difference being first - second.

    ``compare``: explicit ``"A:B"`` pairs; else every method against ``baseline``; else every method
    against ``dpo`` where a run has it, else against the first method in alphabetical order.
    A name that is no method of the runs is a ValueError that lists the methods.
    """
    known = sorted(set(methods))

    def check(name: str, option: str) -> str:
        if name not in known:
            raise ValueError(f"{option}: no method '{name}' among the runs; methods: {', '.join(known)}")
        return name

    if compare:
        pairs = []
        for item in compare:
            first, sep, second = item.partition(":")
            if not sep:
                raise ValueError(f"--compare: expected METHOD:METHOD, got {item!r}")
            pairs.append((check(first.strip(), "--compare"), check(second.strip(), "--compare")))
        return pairs
    if baseline is not None:
        base = check(baseline, "--baseline")
    elif not known:
        return []
    else:
        base = DEFAULT_BASELINE if DEFAULT_BASELINE in known else known[0]
    return [(m, base) for m in known if m != base]


@dataclass
class Comparison:
    """A paired comparison of two methods over their common seeds: ``first`` - ``second`` in ``quantity``."""

    task: str
    first: str
    second: str
    quantity: str
    where: str
    test: PairedTest
    seeds: list[Any]


def _paired(first: dict[Any, float], second: dict[Any, float]) -> tuple[list[Any], PairedTest] | None:
    """The paired t-test over the seeds both ran; None with fewer than two (no test to make)."""
    seeds = sorted(set(first) & set(second), key=seed_order)
    if len(seeds) < 2:
        return None
    return seeds, paired_t_test([first[s] for s in seeds], [second[s] for s in seeds], LEVEL)


def matched_kl_comparisons(fronts: Sequence[Frontier], pairs: Sequence[tuple[str, str]], kls: Sequence[float],
                           reward: str) -> list[Comparison]:
    """For each pair and KL value both frontiers cover: the paired test of the per-seed rewards at that KL
    over the seeds both ran (two at least)."""
    out = []
    by_key = {(f.task, f.method): f for f in fronts}
    for task in sorted({f.task for f in fronts}):
        for first, second in pairs:
            a, b = by_key.get((task, first)), by_key.get((task, second))
            for kl in kls if a is not None and b is not None else ():
                values_a, values_b = a.by_seed(kl), b.by_seed(kl)
                paired = _paired(values_a, values_b) if values_a is not None and values_b is not None else None
                if paired is not None:
                    out.append(Comparison(task, first, second, f"{reward} at KL {kl:g}", "matched KL", paired[1], paired[0]))
    return out


def _compatible(a: Point, b: Point) -> bool:
    """Same task, and the same value of every swept key both points set."""
    return a.task == b.task and all(a.params[k] == b.params[k] for k in a.params
                                    if a.params[k] is not None and b.params.get(k) is not None)


def point_comparisons(points: Sequence[Point], pairs: Sequence[tuple[str, str]],
                      metrics: Sequence[str]) -> list[Comparison]:
    """For each pair, each two points of theirs with compatible settings and each headline metric both
    have: the paired test over their common seeds (two at least)."""
    specs = [m for m in METRICS if m[0] in metrics and m[0] not in NOT_COMPARED]
    out = []
    for first, second in pairs:
        for a in (p for p in points if p.method == first):
            for b in (p for p in points if p.method == second and _compatible(a, p)):
                where = a.describe() if a.describe() == b.describe() else f"{a.describe() or '-'} vs {b.describe() or '-'}"
                for column, section, key in specs:
                    paired = _paired(a.by_seed(section, key), b.by_seed(section, key))
                    if paired is not None:
                        out.append(Comparison(a.task, first, second, column, where or "-", paired[1], paired[0]))
    return out
