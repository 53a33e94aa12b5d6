"""``python -m alignexp.report FOLDER [--out DIR] [--kl 1 2 4] [--compare A:B ...] [--baseline M]``: the
tables and plots of every run below FOLDER, with means and intervals over seeds and paired comparisons.

A run is a folder holding ``eval.json`` (and, normally, the ``config.yaml`` that train.py writes, and
Hydra's ``.hydra/overrides.yaml``); FOLDER may be a single run, ``outputs/``, or a Hydra multirun
folder. Runs that differ only by ``seed`` are replicates of one configuration. Written to ``--out``
(default ``FOLDER/report``):

* ``results.md`` (also printed): the configurations with each metric's mean over seeds and 95%
  t-interval; the reward at matched KL on each method's frontier; paired comparisons of methods over
  their common seeds (paired t-test); and every run on its own, ± its standard error over prompts;
* ``results.csv`` (configurations), ``runs.csv``, ``matched_kl.csv``, ``comparisons.csv``;
* ``frontier.png``: reward against KL, each method's frontier with a bootstrap band (the DPO paper's
  Figure 2, left), the reference at KL 0 and best-of-N at its analytic KL;
* ``win_rate_vs_temperature.png`` (the DPO paper's Figure 2, right) and ``metrics_vs_<param>.png``
  for every swept numeric hyper-parameter (never ``seed``);
* Optuna studies (``hydra/sweeper=optuna_resume``, alignexp/tuning.py): each study's trials with their
  parameters, objective and state, and its best trial, in ``results.md`` and ``trials.csv``;
* prompting baselines (``python -m alignexp.evaluate mode=prompting``) as rows of the tables, lines of
  the win-rate plot and dashed lines (no KL) on the frontier; benchmark scores (``mode=benchmarks``) in
  their own table and ``benchmarks.csv``: reference, policy and their paired difference per benchmark.

Runs composed with ``debug=`` (``debug=fast``: a few steps on little data) are flagged at the top of the
report, and left out of the paired comparisons unless ``--allow-debug`` (their differences are noise or
identical runs, not findings).

``--kl``: the KL values (nats) to compare methods at (default: three inside the range every method's
frontier covers). ``--compare A:B``: the pairs to compare, A - B (default: every method against
``--baseline``, which defaults to ``dpo`` where a run has it). docs/statistics.md explains the statistics.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignexp.report import tables
from alignexp.report.aggregate import (
    comparison_pairs,
    default_kl_points,
    frontiers,
    group_points,
    matched_kl_comparisons,
    point_comparisons,
)
from alignexp.report.plots import plot_against, plot_frontier, plot_win_rate
from alignexp.report.runs import (
    PLOTTED_PARAM_ORDER,
    find_runs,
    numeric,
    reward_key,
    seed_order,
    swept_parameters,
    varied_keys,
)

CONFIGURATIONS_NOTE = (
    "Each metric is the mean over the configuration's seeds with its 95% t-interval [low, high] (Student t on "
    "n - 1 degrees of freedom); a configuration with a single run shows its value ± its standard error over prompts.")
MATCHED_KL_NOTE = (
    "Each seed's runs of a method trace a piecewise-linear curve of {label} against KL (its runs sorted by KL). "
    "At each KL value: the mean over seeds of those curves with its 95% t-interval, where every seed's curve "
    "covers that KL; \"-\": outside that range (never extrapolated). KL values {kls} ({source}).")
BENCHMARKS_NOTE = (
    "lm-evaluation-harness tasks (python -m alignexp.evaluate mode=benchmarks), each benchmark's headline metric: "
    "the reference's and the policy's scores over the same items ± their standard errors, and the mean per-item "
    "difference policy - reference ± its paired standard error; benchmarks.csv has every metric.")
COMPARISONS_NOTE = (
    "first - second over the seeds both ran: the mean difference with its 95% t-interval and the two-sided "
    "p-value of a paired t-test. \"matched KL\" rows compare the methods' frontiers at one KL; the others the "
    "metrics of two configurations whose shared hyper-parameters agree.")


def debug_note(runs: Sequence[Any]) -> str | None:
    """The warning a report opens with where any run was composed with ``debug=``; None where none was."""
    flagged = [r for r in runs if r.debug]
    if not flagged:
        return None
    options = ", ".join(sorted({f"debug={r.debug}" for r in flagged}))
    which = "every run" if len(flagged) == len(runs) else f"{len(flagged)} of {len(runs)} runs"
    kind = "A DEBUG SWEEP" if len(flagged) == len(runs) else "DEBUG RUNS INCLUDED"
    return (f"> **{kind}**: {which} ran under {options} (a few steps on little data, to check that things run): "
            "its figures are not results.")


def write_report(folder: str | Path, out: str | Path | None = None, kls: Sequence[float] | None = None,
                 compare: Sequence[str] | None = None, baseline: str | None = None,
                 allow_debug: bool = False) -> dict[str, Any]:
    """Find the runs below ``folder`` and write the tables and plots; returns what was written. Paired
    comparisons leave out runs composed with ``debug=`` unless ``allow_debug``."""
    found = find_runs(folder)
    if not found:
        raise FileNotFoundError(f"{folder}: no eval.json at or below this folder (a run writes one at its end)")
    runs = [r for r in found if not r.benchmarks_only]
    benchmark_rows = tables.benchmark_rows(found)
    if kls is not None and any(not kl >= 0 for kl in kls):
        raise ValueError(f"--kl: KL values must be >= 0, got {list(kls)}")
    out = Path(out) if out is not None else Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    params = swept_parameters(runs)
    metrics = tables.present_metrics(runs)
    points = group_points(runs, params)
    pairs = comparison_pairs([p.method for p in points], compare, baseline)
    reward = reward_key(runs)
    fronts = frontiers(runs, reward[0]) if reward is not None else []
    kl_source = "from --kl" if kls is not None else "chosen inside the range every method covers"
    kls = sorted(set(kls)) if kls is not None else default_kl_points(fronts)
    warning = debug_note(runs)
    refused = warning is not None and not allow_debug
    if refused:  # compare only what real runs there are
        real = [r for r in runs if not r.debug]
        compared_points = group_points(real, params)
        compared_fronts = frontiers(real, reward[0]) if reward is not None and real else []
    else:
        compared_points, compared_fronts = points, fronts
    comparisons = (matched_kl_comparisons(compared_fronts, pairs, kls, reward[0]) if reward is not None else [])
    comparisons += point_comparisons(compared_points, pairs, [m[0] for m in metrics])
    rows = tables.run_rows(runs, params, metrics)

    seeds = sorted({r.seed for r in runs}, key=seed_order)
    swept = varied_keys(runs, params)
    sections = [f"# Results\n\n{len(runs)} runs in {len(points)} configurations; methods: "
                f"{', '.join(sorted({p.method for p in points}))}; seeds: {tables.seeds_text(seeds)}; swept: "
                f"{', '.join(swept) or 'nothing'}.\n" + (f"\n{warning}\n" if warning else ""),
                f"## Configurations\n\n{CONFIGURATIONS_NOTE}\n\n" + tables.points_markdown(points, params, metrics)]
    if not fronts:
        sections.append("## Reward at matched KL\n\n(no run has both a KL and a gold reward or judge score)\n")
    else:
        note = MATCHED_KL_NOTE.format(label=reward[1], kls=", ".join(f"{k:g}" for k in kls) or "none",
                                      source=kl_source if kls else "no range common to every method: name them with --kl")
        sections.append(f"## {reward[1].capitalize()} at matched KL\n\n{note}\n\n" + tables.matched_kl_markdown(fronts, kls))
    if refused and not comparisons:
        sections.append("## Paired comparisons\n\n(not made: the runs ran under debug=, so their differences "
                        "are not findings; --allow-debug compares them anyway)\n")
    elif not pairs:
        sections.append("## Paired comparisons\n\n(one method: nothing to compare)\n")
    elif not comparisons:
        sections.append("## Paired comparisons\n\n(fewer than two seeds in common, so no paired test, for "
                        f"{', '.join(f'{a} - {b}' for a, b in pairs)})\n")
    else:
        sections.append(f"## Paired comparisons\n\n{COMPARISONS_NOTE}\n\n" + tables.comparisons_markdown(comparisons))
    sections.append("## Runs\n\nEvery run, ± its standard error over prompts.\n\n" + tables.runs_markdown(rows, params, metrics))
    from alignexp.report.tuning import studies_markdown, trials_csv
    from alignexp.tuning import find_studies

    studies = find_studies(folder)
    if studies:
        sections.append(studies_markdown(studies))
    if benchmark_rows:
        sections.append(f"## Benchmarks\n\n{BENCHMARKS_NOTE}\n\n" + tables.benchmarks_markdown(benchmark_rows))
    markdown = "\n".join(sections)

    written = {"results.md": markdown, "results.csv": tables.points_csv(points, params, metrics),
               "runs.csv": tables.runs_csv(rows, params, metrics),
               "comparisons.csv": tables.comparisons_csv(comparisons)}
    if studies:
        written["trials.csv"] = trials_csv(studies)
    if benchmark_rows:
        written["benchmarks.csv"] = tables.benchmarks_csv(benchmark_rows)
    if fronts:
        written["matched_kl.csv"] = tables.matched_kl_csv(fronts, kls, reward[0])
    for name, text in written.items():
        (out / name).write_text(text)
    plots = [plot_frontier(runs, points, fronts, reward, out / "frontier.png", params, kls) if reward else None,
             plot_win_rate(points, params, out / "win_rate_vs_temperature.png")]
    numeric_params = [p for p in params if any(numeric(point.params[p]) is not None for point in points)]
    numeric_params.sort(key=lambda p: (PLOTTED_PARAM_ORDER.index(p) if p in PLOTTED_PARAM_ORDER
                                       else len(PLOTTED_PARAM_ORDER), p))
    for param in numeric_params:
        plots.append(plot_against(points, param, [m[0] for m in metrics], out / f"metrics_vs_{param.replace('.', '_')}.png"))
    return {"runs": len(found), "parameters": params, "swept": swept, "debug": warning is not None,
            "markdown": markdown, "folder": out, "points": points,
            "frontiers": fronts, "kls": kls, "comparisons": comparisons,
            "files": [out / name for name in written] + [p for p in plots if p is not None]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignexp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run, outputs/, or a Hydra multirun folder")
    parser.add_argument("--out", default=None, help="where to write the report (default: FOLDER/report)")
    parser.add_argument("--kl", type=float, nargs="+", default=None, metavar="KL",
                        help="KL values (nats) at which to compare the methods' frontiers (default: three "
                             "inside the range every method covers)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="A:B",
                        help="method pairs to compare, A - B (default: every method against --baseline)")
    parser.add_argument("--baseline", default=None, help="the method the others are compared with (default: dpo "
                                                         "where present, else the first method)")
    parser.add_argument("--allow-debug", action="store_true",
                        help="make the paired comparisons with runs composed with debug= too (left out by default)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folder, args.out, args.kl, args.compare, args.baseline, args.allow_debug)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(written["markdown"])
    print(f"[alignexp] {written['runs']} runs; swept: {', '.join(written['swept']) or 'nothing'}"
          + ("; DEBUG runs (debug=): not results" if written["debug"] else ""))
    for path in written["files"]:
        print(f"[alignexp] wrote {path}")
    return 0
