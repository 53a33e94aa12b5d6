"""``python -m alignexp.report FOLDER [--out DIR]``: one table and the plots of every run below FOLDER.

A run is a folder holding ``eval.json`` (and, normally, the ``config.yaml`` that train.py writes,
and Hydra's ``.hydra/overrides.yaml``); FOLDER may be a single run, ``outputs/``, or a Hydra multirun
folder. Written to ``--out`` (default ``FOLDER/report``):

* ``results.md`` and ``results.csv``: one row per run with its method (the loss, and the sampler
  where it is not ``offline``; a ``sampler=best_of_n`` run shows its best-of-N reward at the analytic
  KL), the hyper-parameters that differ between runs (from each run's
  config and command-line overrides) and its headline metrics (policy at temperature 1; mean ±
  stderr in Markdown, separate stderr columns in CSV);
* ``frontier.png``: gold reward (or judge score) against KL to the reference, one colour per method
  with error bars on both axes, the reference at KL 0, and best-of-N (where a run's eval.json has it)
  at its analytic KL log N - (N-1)/N: the DPO paper's Figure 2 (left);
* ``win_rate_vs_temperature.png``: win rate against sampling temperature, one line per run
  (the DPO paper's Figure 2, right);
* ``metrics_vs_<param>.png``: for every swept numeric hyper-parameter (``loss.beta``,
  ``loss.margin``, ``task.ranking_length``, ...), the headline metrics against it, one line per method.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Hyper-parameters that are not an experiment's subject: left out of "swept" even where they differ.
IGNORED_PREFIXES = ("paths.", "hydra.", "logger.", "hardware.", "eval.", "export.", "agreement.")
# loss and sampler choices are the "method" column.
IGNORED_KEYS = {"policy", "reference", "mode", "init_from", "model.path", "loss", "loss.name", "sampler",
                "sampler.name"}

# The headline metrics a table shows, in order, where at least one run has them: (column, section, key).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("gold_reward", "policy", "gold_reward"),
    ("judge_score", "policy", "judge_score"),
    ("kl", "policy", "kl"),
    ("win_rate", "comparisons", "win_rate_vs_reference"),
    ("preference_accuracy", "policy", "preference_accuracy"),
    ("bleu", "policy", "bleu"),
    ("chrf", "policy", "chrf"),
    ("ter", "policy", "ter"),
    ("rouge_l", "policy", "rouge_l"),
    ("response_tokens", "policy", "response_tokens"),
)
PLOTTED_PARAM_ORDER = ("loss.beta", "loss.margin", "task.ranking_length")


@dataclass
class Run:
    """One run folder: its eval.json, flattened config and command-line overrides."""

    path: Path
    name: str
    record: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The loss, with the sampler where it is not ``offline``; ``best_of_n`` for that baseline."""
        sampler = self.config.get("sampler.name")
        if sampler == "best_of_n":
            return "best_of_n"
        loss = self.record.get("loss") or self.config.get("loss.name") or "?"
        return f"{loss} ({sampler})" if sampler not in (None, "offline") else str(loss)

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
    """Every folder at or below ``folder`` that holds an eval.json, sorted by path."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    paths = [root / "eval.json"] if (root / "eval.json").is_file() else []
    paths += sorted(p for p in root.rglob("eval.json") if p.parent != root)
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
        runs.append(Run(run, name, record, config, _overrides(run / ".hydra" / "overrides.yaml")))
    return runs


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _parse(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def swept_parameters(runs: Sequence[Run]) -> list[str]:
    """Config keys (and override keys) whose values differ between runs; for one run, its overrides."""
    if len(runs) == 1:
        return sorted(k for k in runs[0].overrides if not _ignored(k))
    keys = sorted({k for r in runs for k in (*r.config, *r.overrides) if not _ignored(k)})
    swept = []
    for key in keys:  # a key only some runs have (a method's own hyper-parameter) counts where it varies
        values = {json.dumps(_value(r, key), sort_keys=True, default=str) for r in runs
                  if key in r.config or key in r.overrides}
        if len(values) > 1:
            swept.append(key)
    return swept


def _value(run: Run, key: str) -> Any:
    if key in run.config:
        return run.config[key]
    return _parse(run.overrides[key]) if key in run.overrides else None


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return f"{text} ± {stderr:.3f}" if stderr is not None and not math.isnan(stderr) else text


def table(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """(parameter columns, one row per run, metric columns present) for the Markdown/CSV tables."""
    params = swept_parameters(runs)
    present = [m for m in METRICS if any(r.metric(m[1], m[2])[0] is not None for r in runs)]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "short_name": run.short_name, "method": run.method,
                               "task": run.record.get("task", "-")}
        for key in params:
            row[key] = _value(run, key)
        for column, section, key in present:
            row[column], row[f"{column}_stderr"] = run.metric(section, key)
        rows.append(row)
    return params, rows, [m[0] for m in present]


def markdown_table(params: Sequence[str], rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    header = ["run", "method", "task", *params, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row["short_name"]), str(row["method"]), str(row["task"])]
        cells += ["-" if row.get(p) is None else str(row[p]) for p in params]
        cells += [_fmt(row.get(m), row.get(f"{m}_stderr")) for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(params: Sequence[str], rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    header = ["run", "method", "task", *params]
    for m in metrics:
        header += [m, f"{m}_stderr"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in header})
    return buffer.getvalue()


# -- plots -----------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, legend_size: int) -> Path:
    """Grid and legend on ``ax``, then write the figure as a PNG and close it."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(methods)))}


def _reward_key(runs: Sequence[Run]) -> tuple[str, str] | None:
    for key, label in (("gold_reward", "gold reward"), ("judge_score", "judge score")):
        if any(r.metric("policy", key)[0] is not None for r in runs):
            return key, label
    return None


def plot_frontier(runs: Sequence[Run], path: Path, params: Sequence[str] = ()) -> Path | None:
    """Reward against KL per method (with the reference at KL 0 and best-of-N at its analytic KL);
    each point is labelled with its run's swept values where there are few runs."""
    reward = _reward_key(runs)
    if reward is None or not any(r.metric("policy", "kl")[0] is not None for r in runs):
        return None
    key, label = reward
    plt = _pyplot()
    colours = _colours([r.method for r in runs])
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method in sorted(colours):
        points = [(r.metric("policy", "kl"), r.metric("policy", key)) for r in runs if r.method == method]
        points = [(k, v) for k, v in points if k[0] is not None and v[0] is not None]
        if not points:
            continue
        ax.errorbar([k[0] for k, _ in points], [v[0] for _, v in points],
                    xerr=[k[1] or 0.0 for k, _ in points], yerr=[v[1] or 0.0 for _, v in points],
                    fmt="o", color=colours[method], label=method, capsize=3, markersize=6, alpha=0.85)
    if params and len(runs) <= 16:  # label points with their swept values where the label hides nothing
        ax.autoscale_view()
        anchors = []
        for r in runs:
            kl, value = r.metric("policy", "kl")[0], r.metric("policy", key)[0]
            if kl is not None and value is not None:
                anchors.append((r, *ax.transData.transform((kl, value)), kl, value))
        boxes: list[tuple[float, float, float, float]] = []
        for r, x, y, kl, value in anchors:
            text = _values(r, params)
            box = (x + 3, y + 2, x + 8 + 5.5 * len(text), y + 16)  # the label's extent in pixels
            hides_point = any(box[0] - 4 <= px <= box[2] and box[1] - 4 <= py <= box[3] + 4
                              for other, px, py, _, _ in anchors if other is not r)
            hides_label = any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in boxes)
            if text and not hides_point and not hides_label:
                boxes.append(box)
                ax.annotate(text, (kl, value), textcoords="offset points", xytext=(5, 5), fontsize=7,
                            color=colours[r.method])
    references = {}
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
    ax.margins(x=0.1)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel(f"{label} (held-out prompts, T=1)")
    ax.set_title(f"{label.capitalize()} against KL to the reference")
    return _finish(fig, ax, path, legend_size=8)


def _values(run: Run, params: Sequence[str]) -> str:
    """``beta=0.1, ranking_length=4``: the run's swept values, short names, unset ones left out."""
    keys = [k for k in params if not (run.method == "best_of_n" and k.startswith("loss."))]  # nothing trained
    return ", ".join(f"{k.split('.')[-1]}={_value(run, k)}" for k in keys if _value(run, k) is not None)


def _label(run: Run, params: Sequence[str]) -> str:
    values = _values(run, params)
    return run.method + (f" ({values})" if values else "")


def plot_win_rate(runs: Sequence[Run], params: Sequence[str], path: Path) -> Path | None:
    """Win rate against sampling temperature, one line per run (coloured by method)."""
    series = []
    for run in runs:
        points = []
        for t, entry in (run.record.get("by_temperature") or {}).items():
            comparisons = entry.get("comparisons") or {}
            if "win_rate_vs_reference" in comparisons:
                points.append((float(t), comparisons["win_rate_vs_reference"],
                               comparisons.get("win_rate_vs_reference_stderr", 0.0)))
        if points:
            series.append((run, sorted(points)))
    if not series:
        return None
    plt = _pyplot()
    colours = _colours([r.method for r, _ in series])
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    seen: dict[str, int] = {}
    for run, points in series:
        k = seen[run.method] = seen.get(run.method, -1) + 1
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    fmt="o" + styles[k % len(styles)], color=colours[run.method], capsize=3,
                    label=_label(run, params) if len(series) <= 12 else (run.method if k == 0 else None))
    ax.axhline(0.5, color="black", linewidth=0.8, alpha=0.5)
    judges = {(e.get("comparisons") or {}).get("judge") for r, _ in series
              for e in (r.record.get("by_temperature") or {}).values()} - {None}
    baselines = {(e.get("comparisons") or {}).get("baseline") for r, _ in series
                 for e in (r.record.get("by_temperature") or {}).values()} - {None}
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs baseline")
    ax.set_title(f"Win rate (judge: {', '.join(sorted(judges)) or '?'}; baseline: "
                 f"{', '.join(sorted(baselines)) or '?'})", fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, path, legend_size=7)


def _numeric(value: Any) -> float | None:
    value = _parse(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_against(runs: Sequence[Run], param: str, metrics: Sequence[str], path: Path) -> Path | None:
    """The headline metrics against one numeric hyper-parameter, one line per method."""
    specs = [m for m in METRICS if m[0] in metrics and m[0] not in ("response_tokens", "ter")][:4]
    usable = [r for r in runs if _numeric(_value(r, param)) is not None]
    if len({_numeric(_value(r, param)) for r in usable}) < 2 or not specs:
        return None
    plt = _pyplot()
    colours = _colours([r.method for r in usable])
    fig, axes = plt.subplots(1, len(specs), figsize=(4.0 * len(specs), 3.8), squeeze=False)
    for ax, (column, section, key) in zip(axes[0], specs):
        for method in sorted(colours):
            points = sorted((_numeric(_value(r, param)), *r.metric(section, key)) for r in usable
                            if r.method == method and r.metric(section, key)[0] is not None)
            if points:
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                            fmt="o-", color=colours[method], capsize=3, label=method)
        ax.set_xlabel(param)
        ax.set_ylabel(column.replace("_", " "))
        values = sorted({_numeric(_value(r, param)) for r in usable})
        if values[0] > 0 and values[-1] / values[0] >= 20:
            ax.set_xscale("log")
        elif all(float(v).is_integer() for v in values):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"Headline metrics against {param}", fontsize=11)
    return _finish(fig, axes[0][0], path, legend_size=8)


# -- the command -------------------------------------------------------------------------------------------
def write_report(folder: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Find the runs below ``folder`` and write the tables and plots; returns what was written."""
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"{folder}: no eval.json at or below this folder (a run writes one at its end)")
    out = Path(out) if out is not None else Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    params, rows, metrics = table(runs)
    markdown = markdown_table(params, rows, metrics)
    (out / "results.md").write_text(markdown)
    (out / "results.csv").write_text(csv_table(params, rows, metrics))
    plots = [plot_frontier(runs, out / "frontier.png", params), plot_win_rate(runs, params, out / "win_rate_vs_temperature.png")]
    numeric = [p for p in params if any(_numeric(_value(r, p)) is not None for r in runs)]
    numeric.sort(key=lambda p: (PLOTTED_PARAM_ORDER.index(p) if p in PLOTTED_PARAM_ORDER else len(PLOTTED_PARAM_ORDER), p))
    for param in numeric:
        plots.append(plot_against(runs, param, metrics, out / f"metrics_vs_{param.replace('.', '_')}.png"))
    return {"runs": len(runs), "parameters": params, "markdown": markdown, "folder": out,
            "files": [out / "results.md", out / "results.csv", *[p for p in plots if p is not None]]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignexp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run, outputs/, or a Hydra multirun folder")
    parser.add_argument("--out", default=None, help="where to write the report (default: FOLDER/report)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folder, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(written["markdown"])
    print(f"[alignexp] {written['runs']} runs; swept: {', '.join(written['parameters']) or 'nothing'}")
    for path in written["files"]:
        print(f"[alignexp] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
