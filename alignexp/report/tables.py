"""The report's tables, in Markdown (results.md) and CSV: configurations with their means and intervals
over seeds, the reward at matched KL, the paired comparisons, and every run on its own."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

from alignexp.metrics.seeds import Interval
from alignexp.report.aggregate import Comparison, Frontier, Point
from alignexp.report.runs import METRICS, Run, value_of


def _finite(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def fmt(value: float | None, stderr: float | None = None) -> str:
    """``0.482`` (3 decimals; 1 from 1000 on), ``0.482 ± 0.013`` with a stderr, ``-`` for none."""
    if not _finite(value):
        return "-"
    text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    return f"{text} ± {stderr:.3f}" if _finite(stderr) else text


def fmt_interval(interval: Interval | None) -> str:
    """``0.482 [0.451, 0.513]`` for a mean over seeds; one run: its value ± its stderr over prompts."""
    if interval is None or not _finite(interval.mean):
        return "-"
    if _finite(interval.low) and _finite(interval.high):
        return f"{fmt(interval.mean)} [{fmt(interval.low)}, {fmt(interval.high)}]"
    return fmt(interval.mean, interval.stderr)


def fmt_p(p: float) -> str:
    return "-" if not _finite(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None or (isinstance(row[k], float) and math.isnan(row[k])) else row[k]
                         for k in header})
    return buffer.getvalue()


def seeds_text(seeds: Sequence[Any]) -> str:
    return " ".join("?" if s is None else str(s) for s in seeds)


def present_metrics(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """The headline metrics (:data:`METRICS`) that at least one run has."""
    return [m for m in METRICS if any(r.metric(m[1], m[2])[0] is not None for r in runs)]


# -- configurations ------------------------------------------------------------------------------------
def points_markdown(points: Sequence[Point], params: Sequence[str], metrics: Sequence[tuple[str, str, str]]) -> str:
    rows = []
    for p in points:
        cells = [p.method, p.task, *["-" if p.params[k] is None else str(p.params[k]) for k in params], seeds_text(p.seeds)]
        rows.append(cells + [fmt_interval(p.summary(section, key)) for _, section, key in metrics])
    return _markdown(["method", "task", *params, "seeds", *[m[0] for m in metrics]], rows)


def points_csv(points: Sequence[Point], params: Sequence[str], metrics: Sequence[tuple[str, str, str]]) -> str:
    header = ["method", "task", *params, "n_seeds", "seeds"]
    for column, _, _ in metrics:
        header += [column, f"{column}_ci_low", f"{column}_ci_high", f"{column}_stderr"]
    rows = []
    for p in points:
        row: dict[str, Any] = {"method": p.method, "task": p.task, **p.params, "n_seeds": len(p.seeds),
                               "seeds": seeds_text(p.seeds)}
        for column, section, key in metrics:
            s = p.summary(section, key)
            if s is not None:
                row.update({column: s.mean, f"{column}_ci_low": s.low, f"{column}_ci_high": s.high,
                            f"{column}_stderr": s.stderr})
        rows.append(row)
    return _csv(header, rows)


# -- reward at matched KL --------------------------------------------------------------------------------
def matched_kl_markdown(fronts: Sequence[Frontier], kls: Sequence[float]) -> str:
    rows = []
    for f in fronts:
        span = f"{f.low:.2f} to {f.high:.2f}" if f.has_range else "one KL per seed"
        rows.append([f.method, f.task, seeds_text(f.seeds), span, *[fmt_interval(f.at(kl)) for kl in kls]])
    return _markdown(["method", "task", "seeds", "KL range", *[f"KL {kl:g}" for kl in kls]], rows)


def matched_kl_csv(fronts: Sequence[Frontier], kls: Sequence[float], reward: str) -> str:
    header = ["method", "task", "kl", reward, "ci_low", "ci_high", "stderr", "n_seeds", "kl_low", "kl_high"]
    rows = []
    for f in fronts:
        for kl in kls:
            s = f.at(kl)
            rows.append({"method": f.method, "task": f.task, "kl": kl, "n_seeds": len(f.seeds),
                         "kl_low": f.low if f.has_range else None, "kl_high": f.high if f.has_range else None,
                         **({} if s is None else {reward: s.mean, "ci_low": s.low, "ci_high": s.high, "stderr": s.stderr})})
    return _csv(header, rows)


# -- paired comparisons ---------------------------------------------------------------------------------
def comparisons_markdown(comparisons: Sequence[Comparison]) -> str:
    rows = [[f"{c.first} - {c.second}", c.task, c.quantity, c.where,
             fmt_interval(Interval(c.test.difference, c.test.low, c.test.high, c.test.n)),
             fmt_p(c.test.p_value), seeds_text(c.seeds)] for c in comparisons]
    return _markdown(["difference", "task", "quantity", "where", "mean [95% CI]", "p (paired t)", "seeds"], rows)


def comparisons_csv(comparisons: Sequence[Comparison]) -> str:
    header = ["first", "second", "task", "quantity", "where", "difference", "ci_low", "ci_high", "p_value", "t",
              "df", "n_seeds", "seeds", "test"]
    rows = [{"first": c.first, "second": c.second, "task": c.task, "quantity": c.quantity, "where": c.where,
             "difference": c.test.difference, "ci_low": c.test.low, "ci_high": c.test.high, "p_value": c.test.p_value,
             "t": c.test.t, "df": c.test.df, "n_seeds": c.test.n, "seeds": seeds_text(c.seeds), "test": c.test.test}
            for c in comparisons]
    return _csv(header, rows)


# -- runs ------------------------------------------------------------------------------------------------
def run_rows(runs: Sequence[Run], params: Sequence[str], metrics: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One row per run: its name, method, task, seed, swept values and metrics with their stderr."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "short_name": run.short_name, "method": run.method,
                               "task": run.record.get("task", "-"), "seed": run.seed}
        row.update({key: value_of(run, key) for key in params})
        for column, section, key in metrics:
            row[column], row[f"{column}_stderr"] = run.metric(section, key)
        rows.append(row)
    return rows


def runs_markdown(rows: Sequence[dict[str, Any]], params: Sequence[str], metrics: Sequence[tuple[str, str, str]]) -> str:
    columns = [m[0] for m in metrics]
    body = [[str(r["short_name"]), str(r["method"]), str(r["task"]), "-" if r["seed"] is None else str(r["seed"]),
             *["-" if r.get(p) is None else str(r[p]) for p in params],
             *[fmt(r.get(c), r.get(f"{c}_stderr")) for c in columns]] for r in rows]
    return _markdown(["run", "method", "task", "seed", *params, *columns], body)


def runs_csv(rows: Sequence[dict[str, Any]], params: Sequence[str], metrics: Sequence[tuple[str, str, str]]) -> str:
    header = ["run", "method", "task", "seed", *params]
    for column, _, _ in metrics:
        header += [column, f"{column}_stderr"]
    return _csv(header, rows)


# -- benchmarks (lm-evaluation-harness) ------------------------------------------------------------------
BENCHMARK_HEADER = ["run", "method", "benchmark", "metric", "reference", "reference_stderr", "policy", "policy_stderr",
                    "difference", "difference_stderr", "n", "num_fewshot", "headline"]


def benchmark_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (run, benchmark, metric) of every eval.json's ``benchmarks``, its headline metric first."""
    rows = []
    for run in runs:
        for name, task in ((run.record.get("benchmarks") or {}).get("tasks") or {}).items():
            headline = task.get("headline")
            for metric in sorted(task.get("metrics") or {}, key=lambda m: (m != headline, m)):
                rows.append({"run": run.name, "short_name": run.short_name, "method": run.method, "benchmark": name,
                             "metric": metric, "num_fewshot": task.get("num_fewshot"), "headline": metric == headline,
                             **task["metrics"][metric]})
    return rows


def benchmarks_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The headline metric of each benchmark of each run: reference, policy and their paired difference."""
    body = [[str(r["short_name"]), str(r["method"]), str(r["benchmark"]), str(r["metric"]),
             fmt(r.get("reference"), r.get("reference_stderr")), fmt(r.get("policy"), r.get("policy_stderr")),
             fmt(r.get("difference"), r.get("difference_stderr")), str(r.get("n", "-"))] for r in rows if r["headline"]]
    return _markdown(["run", "method", "benchmark", "metric", "reference", "policy", "policy - reference", "n"], body)


def benchmarks_csv(rows: Sequence[dict[str, Any]]) -> str:
    return _csv(BENCHMARK_HEADER, [{**r, "num_fewshot": " ".join(map(str, r.get("num_fewshot") or []))} for r in rows])
