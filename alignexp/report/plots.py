"""The report's plots, each point a configuration's mean over seeds with its 95% t-interval drawn
(one run: its stderr over prompts): the reward/KL frontier with each method's fitted curve and bootstrap
band (prompting baselines, which have no KL, as dashed lines), win rate against sampling temperature, and
the headline metrics against each swept hyper-parameter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignexp.metrics.seeds import Interval
from alignexp.report.aggregate import LEVEL, Frontier, Point, interval_over_seeds
from alignexp.report.runs import METRICS, Run, numeric


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, legend_size: int) -> Path:
    """Grid and legend on ``ax`` (one entry per label: configurations of one method share its colour and
    marker), then write the figure as a PNG and close it."""
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    first = {label: handle for handle, label in zip(handles, labels) if label and not label.startswith("_")}
    ax.legend(list(first.values()), list(first), fontsize=legend_size, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method: tab10, or tab20 for more than 10 methods (so no two share one)."""
    names = sorted(set(methods))
    size = 10 if len(names) <= 10 else 20
    cmap = _pyplot().get_cmap(f"tab{size}")
    return {m: cmap(i % size) for i, m in enumerate(names)}


MARKERS = "osD^vP*Xph<>"  # with the colour, one marker per method, for plots read in grey or with many methods


def _marker_style(i: int, count: int) -> dict[str, Any]:
    """Method ``i`` of ``count``: its marker, hollow, and larger the earlier it is drawn, so that methods
    whose points coincide (equal runs, a debug sweep) show as nested outlines instead of hiding each other."""
    return {"fmt": MARKERS[i % len(MARKERS)], "markersize": 5 + 3 * (count - 1 - i), "markerfacecolor": "none",
            "markeredgewidth": 1.5}


def _errors(intervals: Sequence[Interval]) -> list[list[float]]:
    """Matplotlib's (2, N) error bars: the t-interval's two sides, else ± the run's stderr, else 0."""
    lower, upper = [], []
    for iv in intervals:
        if not (math.isnan(iv.low) or math.isnan(iv.high)):
            lower.append(iv.mean - iv.low)
            upper.append(iv.high - iv.mean)
        else:
            error = 0.0 if iv.stderr is None or math.isnan(iv.stderr) else iv.stderr
            lower.append(error)
            upper.append(error)
    return [lower, upper]


def plot_frontier(runs: Sequence[Run], points: Sequence[Point], fronts: Sequence[Frontier], reward: tuple[str, str],
                  path: Path, params: Sequence[str] = (), kls: Sequence[float] = ()) -> Path | None:
    """Reward against KL: each configuration's mean (error bars on both axes), each method's frontier
    (the mean of its per-seed curves) with a 95% bootstrap band over seeds, the reference at KL 0,
    best-of-N at its analytic KL, and dotted lines at the matched-KL values."""
    key, label = reward
    placed = [(p, p.summary("policy", "kl"), p.summary("policy", key)) for p in points]
    placed = [(p, kl, value) for p, kl, value in placed if kl is not None and value is not None]
    if not placed:
        return None
    plt = _pyplot()
    colours = _colours([p.method for p, _, _ in placed])
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    for i, method in enumerate(sorted(colours)):
        mine = [(kl, value) for p, kl, value in placed if p.method == method]
        ax.errorbar([kl.mean for kl, _ in mine], [v.mean for _, v in mine], xerr=_errors([kl for kl, _ in mine]),
                    yerr=_errors([v for _, v in mine]), color=colours[method], label=method, capsize=3, alpha=0.85,
                    **_marker_style(i, len(colours)))
    banded = 0
    for front in fronts:
        grid, mean, low, high = front.band()
        if grid and front.method in colours:
            ax.plot(grid, mean, "-", color=colours[front.method], linewidth=1.2, alpha=0.9,
                    label="frontier: mean over seeds" if banded == 0 else None)
            ax.fill_between(grid, low, high, color=colours[front.method], alpha=0.15, linewidth=0,
                            label=f"{LEVEL:.0%} bootstrap band (seeds)" if banded == 0 else None)
            banded += 1
    if params and len(placed) <= 16:
        _label_points(ax, [(p, kl.mean, v.mean) for p, kl, v in placed], params, colours)
    _reference_and_best_of_n(ax, runs, key)
    _prompting_baselines(ax, points, key)
    for i, kl in enumerate(kls):
        ax.axvline(kl, color="grey", linestyle=":", linewidth=1, label="matched KL" if i == 0 else None)
    ax.margins(x=0.1)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel(f"{label} (held-out prompts, T=1)")
    ax.set_title(f"{label.capitalize()} against KL (mean over seeds, {LEVEL:.0%} intervals)", fontsize=10)
    return _finish(fig, ax, path, legend_size=8)


def varied_params(points: Sequence[Point], params: Sequence[str]) -> dict[str, list[str]]:
    """Per method, the swept parameters whose value differs between its points: in a folder where PPO sweeps
    ``ppo.steps`` and DPO ``train.max_steps``, DPO's points are told apart by ``max_steps`` alone (``ppo.steps``
    is swept, but every DPO point holds its default)."""
    values: dict[str, dict[str, set[str]]] = {}
    for point in points:
        for key in params:
            values.setdefault(point.method, {}).setdefault(key, set()).add(str(point.params.get(key)))
    return {method: [key for key in params if len(seen[key]) > 1] for method, seen in values.items()}


def _label_points(ax, anchors: Sequence[tuple[Point, float, float]], params: Sequence[str], colours: dict) -> None:
    """Label points with the values that tell a method's points apart, where the label hides no other point or
    label."""
    ax.autoscale_view()
    pixels = [(p, *ax.transData.transform((x, y)), x, y) for p, x, y in anchors]
    varied = varied_params([p for p, _, _ in anchors], params)
    boxes: list[tuple[float, float, float, float]] = []
    for p, px, py, x, y in pixels:
        text = p.describe(varied[p.method]) if varied[p.method] else ""
        box = (px + 3, py + 2, px + 8 + 5.5 * len(text), py + 16)  # the label's extent in pixels
        hides_point = any(box[0] - 4 <= qx <= box[2] and box[1] - 4 <= qy <= box[3] + 4
                          for other, qx, qy, _, _ in pixels if other is not p)
        hides_label = any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in boxes)
        if text and not hides_point and not hides_label:
            boxes.append(box)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7, color=colours[p.method])


def _reference_and_best_of_n(ax, runs: Sequence[Run], key: str) -> None:
    """The reference (SFT) policy at KL 0, one marker per SFT policy, and best-of-N from eval.json."""
    references: dict[str, tuple[float, float | None]] = {}
    for r in runs:
        value, stderr = r.metric("reference", key)
        if value is not None:
            references.setdefault(str(r.record.get("init_from")), (value, stderr))
    for i, (value, stderr) in enumerate(references.values()):
        ax.errorbar([0.0], [value], yerr=[stderr or 0.0], fmt="s", color="black", capsize=3,
                    label="reference (SFT)" if i == 0 else None)
    best: dict[int, list[tuple[float, float, float]]] = {}
    for r in runs:
        for entry in r.record.get("best_of_n") or []:
            if key in entry:
                best.setdefault(int(entry["n"]), []).append((entry["kl"], entry[key], entry.get(f"{key}_stderr", 0.0)))
    if best:
        ns = sorted(best)
        kls = [best[n][0][0] for n in ns]
        values = [sum(v for _, v, _ in best[n]) / len(best[n]) for n in ns]
        errors = [best[n][0][2] for n in ns]
        ax.errorbar(kls, values, yerr=errors, fmt="--^", color="grey", capsize=3, label="best-of-N (analytic KL)")
        for n, x, y in zip(ns, kls, values):
            ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8, color="grey")


def _prompting_baselines(ax, points: Sequence[Point], key: str) -> None:
    """Each prompting baseline's reward (mean over its seeds) as a dashed horizontal line with its interval
    shaded: it has no KL to place it on the frontier's axis."""
    baselines = [(p, p.summary("policy", key)) for p in points if p.runs and all(r.is_baseline for r in p.runs)]
    cmap = _pyplot().get_cmap("Dark2")
    for i, (point, value) in enumerate((p, v) for p, v in baselines if v is not None):
        colour = cmap(i % 8)
        ax.axhline(value.mean, color=colour, linestyle="--", linewidth=1.2, label=f"{point.method} (no KL)")
        low, high = _errors([value])
        if low[0] > 0 or high[0] > 0:
            ax.axhspan(value.mean - low[0], value.mean + high[0], color=colour, alpha=0.08, linewidth=0)


def _label(point: Point, params: Sequence[str]) -> str:
    values = point.describe(params)
    return point.method + (f" ({values})" if values else "")


def _temperature_series(point: Point) -> list[tuple[float, Interval]]:
    """The win rate at each sampling temperature: mean over the point's runs with its t-interval."""
    by_t: dict[float, list[tuple[float, float]]] = {}
    for run in point.runs:
        for t, entry in (run.record.get("by_temperature") or {}).items():
            comparisons = entry.get("comparisons") or {}
            if "win_rate_vs_reference" in comparisons:
                by_t.setdefault(float(t), []).append((comparisons["win_rate_vs_reference"],
                                                      comparisons.get("win_rate_vs_reference_stderr", 0.0)))
    out = []
    for t, values in sorted(by_t.items()):
        if len(values) > 1:
            out.append((t, interval_over_seeds("win_rate_vs_reference", [v for v, _ in values])))
        else:
            out.append((t, Interval(values[0][0], math.nan, math.nan, 1, values[0][1])))
    return out


def plot_win_rate(points: Sequence[Point], params: Sequence[str], path: Path) -> Path | None:
    """Win rate against sampling temperature, one line per configuration (coloured by method)."""
    series = [(p, s) for p in points if (s := _temperature_series(p))]
    if not series:
        return None
    plt = _pyplot()
    colours = _colours([p.method for p, _ in series])
    methods = sorted(colours)
    temperatures = sorted({t for _, values in series for t, _ in values})
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if len(temperatures) == 1:  # one temperature: one point per configuration, side by side, not one dot on a T axis
        for x, (point, values) in enumerate(series):
            i = methods.index(point.method)
            ax.errorbar([x], [values[0][1].mean], yerr=_errors([values[0][1]]), color=colours[point.method],
                        capsize=3, label=point.method,
                        **_marker_style(i, len(methods)))
        ax.set_xticks(range(len(series)), [_label(p, params) for p, _ in series], rotation=30, ha="right",
                      fontsize=7)
        ax.set_xlim(-0.6, len(series) - 0.4)
    else:
        styles = ["-", "--", ":", "-."]
        seen: dict[str, int] = {}
        for point, values in series:
            k = seen[point.method] = seen.get(point.method, -1) + 1
            ax.errorbar([t for t, _ in values], [iv.mean for _, iv in values], yerr=_errors([iv for _, iv in values]),
                        fmt="o" + styles[k % len(styles)], color=colours[point.method], capsize=3,
                        label=_label(point, params) if len(series) <= 12 else (point.method if k == 0 else None))
    ax.axhline(0.5, color="black", linewidth=0.8, alpha=0.5)
    entries = [e.get("comparisons") or {} for p, _ in series for r in p.runs
               for e in (r.record.get("by_temperature") or {}).values()]
    judges = {e.get("judge") for e in entries} - {None}
    baselines = {e.get("baseline") for e in entries} - {None}
    ax.set_xlabel("configuration" if len(temperatures) == 1 else "sampling temperature")
    ax.set_ylabel("win rate vs baseline")
    at = f"T={temperatures[0]:g}; " if len(temperatures) == 1 else ""
    ax.set_title(f"Win rate ({at}judge: {', '.join(sorted(judges)) or '?'}; baseline: "
                 f"{', '.join(sorted(baselines)) or '?'}; mean over seeds)", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, path, legend_size=7)


def plot_against(points: Sequence[Point], param: str, metrics: Sequence[str], path: Path) -> Path | None:
    """The headline metrics against one numeric hyper-parameter, one line per method."""
    specs = [m for m in METRICS if m[0] in metrics and m[0] not in ("response_tokens", "ter")][:4]
    usable = [p for p in points if numeric(p.params.get(param)) is not None]
    values = sorted({numeric(p.params[param]) for p in usable})
    if len(values) < 2 or not specs:
        return None
    plt = _pyplot()
    colours = _colours([p.method for p in usable])
    fig, axes = plt.subplots(1, len(specs), figsize=(4.0 * len(specs), 3.8), squeeze=False)
    for ax, (column, section, key) in zip(axes[0], specs):
        for method in sorted(colours):
            line = sorted(((numeric(p.params[param]), p.summary(section, key)) for p in usable if p.method == method),
                          key=lambda item: item[0])
            line = [(x, iv) for x, iv in line if iv is not None]
            if line:
                ax.errorbar([x for x, _ in line], [iv.mean for _, iv in line], yerr=_errors([iv for _, iv in line]),
                            fmt="o-", color=colours[method], capsize=3, label=method)
        ax.set_xlabel(param)
        ax.set_ylabel(column.replace("_", " "))
        if values[0] > 0 and values[-1] / values[0] >= 20:
            ax.set_xscale("log")
        elif all(float(v).is_integer() for v in values):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Headline metrics against {param} (mean over seeds, {LEVEL:.0%} intervals)", fontsize=11)
    return _finish(fig, axes[0][0], path, legend_size=8)
