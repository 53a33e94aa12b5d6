"""The study's analysis: the learning-rate choice, each part's report, and the decisions with Holm's correction.

    python experiments/study/analyze.py --choose-lr    # lr.json from the lr part (run.py calls it)
    python experiments/study/analyze.py                # report/<part>/, results.csv, decisions.md

Each part's runs (multirun/study/<part>/) go through ``python -m alignexp.report`` with the part's
pre-registered KL points and comparisons (the README's decision rules); the paired p-values of each
question's family of comparisons are then adjusted with Holm's step-down method, and every comparison is
classified as the README's rules say.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from alignexp.metrics.seeds import holm, paired_t_test, verdict
from alignexp.report.cli import main as report
from alignexp.report.runs import find_runs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUNS = REPO / "multirun" / "study"

KL_BUDGET = 2.0
MARGIN = 0.01  # a difference in gold reward smaller than this is not worth claiming (the refutation margin)

# The methods added to the frontier part after its first run (issue 24), each against DPO, and ranked SimPO
# against SimPO.
NEW_METHODS = [f"{m}:dpo" for m in ("simpo", "ranked_simpo", "cpo", "orpo", "rpo", "apo_zero", "apo_down", "nca", "exo",
                                    "robust", "bco", "sppo_hard", "discopop", "aot", "dpo_norm", "dpo_forward_kl",
                                    "dpo_js", "dpo_alpha", "dpo_sft_mix", "kto", "kto_gold")] + ["ranked_simpo:simpo"]

# Per part: the KL points (nats) and the comparisons (first:second), fixed before the runs (README).
PLAN: dict[str, dict] = {
    "controls": {"kl": [0.25, 0.5, 1.0], "compare": ["dpo:dpo_32_prompts", "dpo:preferred_ft"]},
    "variants": {"kl": [0.25, 0.5, 1.0],
                 "compare": [f"dpo_{v}:{other}_{v}" for v in ("noisy", "long", "pairs")
                             for other in ("dpo_32_prompts", "preferred_ft")]},
    "frontier": {"kl": [0.5, 1.0, 2.0, 4.0],
                 # RAFT's runs are named by its loss and sampler (its run_name is its loss's name)
                 "compare": [f"{m}:dpo" for m in ("preferred_ft", "cdpo", "ipo", "slic", "rrhf", "pro", "lipo",
                                                  "ranked_dpo", "rso", "raft (raft)", "ppo", "ppo_reward_model",
                                                  "best_of_n")] + NEW_METHODS,
                 # the methods added later (issue 24) are a Holm family of their own, so that adding them leaves the
                 # adjusted p-values of the comparisons planned first as they were
                 "families": [NEW_METHODS]},
    "ranking": {"kl": [1.0, 2.0, 4.0],
                "compare": [f"ranked_dpo_k{k}_{b}:dpo_{p}_k{k}_{b}" for k in (3, 4, 6, 8) for b in ("prompts", "labels")
                            for p in ("best_worst", "adjacent", "all")]},
    "noise": {"kl": [1.0, 2.0],
              "compare": [f"{m}_tau{t}:{m}_tau0" for m in ("dpo", "ranked_dpo", "pro", "rrhf", "lipo")
                          for t in ("0.1", "0.3", "1")]
              + [f"{m}_tau{t}:dpo_tau{t}" for m in ("ranked_dpo", "pro", "rrhf", "lipo") for t in ("0", "0.1", "0.3", "1")]
              + [f"{m}_tau{t}:{m}_k2_tau{t}" for m in ("dpo", "ranked_dpo") for t in ("0", "0.1", "0.3", "1")]},
    "rso": {"kl": [1.0, 2.0, 4.0], "compare": ["rso:sft_sample_rank"]},
    "bootstrap": {"kl": [1.0, 2.0], "compare": ["pro_self_bootstrap:pro", "pro_external:pro",
                                                 "pro_external:pro_self_bootstrap"]},
    "feedback": {"kl": [1.0, 2.0, 4.0],
                 "compare": [f"{m}_{s}:{m}_gold" for m in ("dpo", "ranked_dpo") for s in ("reward_model", "noisy_judge")]
                 + [f"ranked_dpo_{s}:dpo_{s}" for s in ("gold", "reward_model", "noisy_judge")]},
}
# The primary comparison rerun alone (run.py's ``primary`` part, the ranking part's protocol): its comparisons
# belong to the ranking part's family of 32, so their p-values are multiplied by 32 (Bonferroni), an upper
# bound of the Holm-adjusted p-value they would have in the whole family.
PLAN["primary"] = {"kl": [1.0, 2.0, 4.0], "compare": ["ranked_dpo_k4_prompts:dpo_best_worst_k4_prompts"],
                   "bonferroni": 32}
PRIMARY = ("ranking", "ranked_dpo_k4_prompts", "dpo_best_worst_k4_prompts", 2.0)


# -- the learning rate ---------------------------------------------------------------------------------------
def budget_objective(points: list[tuple[float, float]], budget: float = KL_BUDGET) -> float:
    """The highest gold reward of a frontier (points (KL, reward), one per training length, each the mean
    over seeds) within the KL budget: the best point at KL <= budget, or the curve's value where it
    crosses the budget (linear between the two points around it)."""
    points = sorted(points)
    best = max((r for k, r in points if k <= budget), default=-math.inf)
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= budget < k1:
            best = max(best, r0 + (r1 - r0) * (budget - k0) / (k1 - k0))
    return best


def choose_lrs() -> dict:
    chosen = {}
    for arm in sorted((RUNS / "lr").iterdir()):
        if not arm.is_dir():
            continue
        by_lr: dict[float, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for run in find_runs(arm):
            lr = float(run.config.get("train.lr"))
            steps = int(run.config.get("sampler.iterations", 1) or 1) * int(run.config.get("train.max_steps"))
            kl, reward = run.metric("policy", "kl")[0], run.metric("policy", "gold_reward")[0]
            by_lr[lr][steps].append((kl, reward))
        objectives = {}
        for lr, by_steps in by_lr.items():
            means = [(sum(k for k, _ in v) / len(v), sum(r for _, r in v) / len(v)) for v in by_steps.values()]
            objectives[lr] = budget_objective(means)
        best = max(objectives, key=objectives.get)
        chosen[arm.name] = {"lr": best, "objective": round(objectives[best], 4),
                            "by_lr": {f"{lr:g}": round(v, 4) for lr, v in sorted(objectives.items())}}
        print(f"{arm.name:<14} lr {best:g}  (validation gold reward at KL <= {KL_BUDGET:g}: "
              + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(objectives.items())) + ")")
    (HERE / "lr.json").write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


# -- decisions -----------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def analyse(runs: Path, part: str, plan: dict, out: Path) -> list[dict]:
    methods = {run.method for run in find_runs(runs / part)}
    compare = [pair for pair in plan["compare"] if set(pair.split(":")) <= methods]  # the arms that ran
    argv = [str(runs / part), "--out", str(out), "--kl", *map(str, plan["kl"]), "--compare", *compare]
    if report(argv) != 0:
        raise SystemExit(f"the report of part {part} failed")
    control = best_of_n_control(runs) if part == "controls" else None
    return decide(part, plan, out, [control] if control else [])


def decide(part: str, plan: dict, out: Path, extra: list[dict] = ()) -> list[dict]:
    """The part's decisions from its report's matched-KL comparisons (``out/comparisons.csv``) and ``extra``
    rows: Holm's adjustment within each family and each row's verdict."""
    rows = [r for r in read_csv(out / "comparisons.csv") if r["where"] == "matched KL"] + list(extra)
    # Holm within each family: the plan's "families" (lists of comparisons), the rest of the part one family
    families = [set(f) for f in plan.get("families", [])]

    def family_of(row: dict) -> int:
        pair = f"{row['first']}:{row['second']}"
        return next((i for i, f in enumerate(families) if pair in f), len(families))

    size = plan.get("bonferroni")
    for index in sorted({family_of(r) for r in rows}):
        members = [r for r in rows if family_of(r) == index]
        adjusted = ([min(1.0, size * float(r["p_value"])) for r in members] if size
                    else holm([float(r["p_value"]) for r in members]))
        for row, p in zip(members, adjusted):
            row.update(part=part, p_holm=p, family=size or len(members),
                       verdict=verdict(float(row["difference"]), float(row["ci_high"]), p, MARGIN))
    return rows


def frontier_markdown(where: Path, decisions: list[dict]) -> str:
    """The frontier part's table: each method's learning rate, the KL range every seed covers, its gold reward at
    each registered KL (mean over seeds [95% t-interval]; "-" outside that range, never extrapolated) and its
    comparison with DPO there (difference, Holm p and verdict), best at KL 2 first."""
    points = read_csv(where / "report" / "frontier" / "matched_kl.csv")
    if not points:
        return ""
    lrs = json.loads((where / "lr.json").read_text()) if (where / "lr.json").exists() else {}
    kls = PLAN["frontier"]["kl"]
    against = {(r["first"], r["quantity"].rsplit(" ", 1)[-1]): r for r in decisions
               if r["part"] == "frontier" and r["second"] == "dpo"}
    by_method: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in points:
        by_method[row["method"]][f"{float(row['kl']):g}"] = row

    def at(method: str, kl: float) -> float:
        value = by_method[method].get(f"{kl:g}", {}).get("gold_reward")
        return float(value) if value else -math.inf

    lines = ["| method | lr | KL range | " + " | ".join(f"KL {kl:g}" for kl in kls) + " | vs DPO: difference (Holm p, verdict) |",
             "|---|---|---|" + "---|" * len(kls) + "---|"]
    for method in sorted(by_method, key=lambda m: [-at(m, 2.0), -at(m, 1.0), -at(m, 0.5), m]):
        rows = by_method[method]
        first = next(iter(rows.values()))
        cells = []
        for kl in kls:
            row = rows.get(f"{kl:g}", {})
            cells.append(f"{float(row['gold_reward']):.3f} [{float(row['ci_low']):.3f}, {float(row['ci_high']):.3f}]"
                         if row.get("gold_reward") else "-")
        versus = []
        for kl in kls:
            row = against.get((method, f"{kl:g}"))
            if row:
                versus.append(f"{kl:g}: {float(row['difference']):+.3f} (p {row['p_holm']:.2g}, {row['verdict']})")
        lr = lrs.get(method.split(" (")[0], {}).get("lr")
        lines.append(f"| {method} | {'-' if lr is None else f'{lr:g}'} | "
                     f"{float(first['kl_low']):.2f}-{float(first['kl_high']):.2f} | " + " | ".join(cells) + " | "
                     + ("; ".join(versus) or "-") + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| part | first - second | quantity | difference [95% CI] | p | p (Holm, family) | seeds | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['first']} - {r['second']} | {r['quantity']} | {float(r['difference']):+.3f} "
                     f"[{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}] | {float(r['p_value']):.3g} | "
                     f"{r['p_holm']:.3g} ({r['family']}) | {r['n_seeds']} | {r['verdict']} |")
    return "\n".join(lines)


def best_of_n_control(runs: Path, n: int = 16) -> dict | None:
    """Positive control 1: best-of-``n`` (gold selection) against the SFT policy, paired over seeds (each
    seed's evaluation samples its own), as a decision row."""
    pairs = {}
    for run in find_runs(runs / "controls" / "best_of_n"):
        entry = next((e for e in run.record.get("best_of_n", []) if e.get("n") == n), None)
        if entry is not None:
            pairs[run.seed] = (entry["gold_reward"], run.record["reference"]["gold_reward"])
    if len(pairs) < 2:
        return None
    test = paired_t_test([a for a, _ in pairs.values()], [b for _, b in pairs.values()])
    return {"part": "controls", "first": f"best_of_{n}", "second": "sft", "quantity": "gold_reward",
            "difference": test.difference, "ci_low": test.low, "ci_high": test.high, "p_value": test.p_value,
            "n_seeds": test.n}


def k2_check(runs: Path) -> str:
    """Ranked DPO at k = 2 is DPO (README, question b): the two arms' runs, job by job, must agree."""
    part = next((p for p in ("ranking", "primary") if (runs / p / "dpo_k2_both").exists()), "ranking")
    first, second = runs / part / "ranked_dpo_k2_both", runs / part / "dpo_k2_both"
    if not (first.exists() and second.exists()):
        return ""
    key = lambda run: (run.seed, run.config.get("train.max_steps"))  # noqa: E731
    theirs = {key(run): run for run in find_runs(second)}
    gaps = {"gold_reward": 0.0, "kl": 0.0}
    matched = 0
    for run in find_runs(first):
        other = theirs.get(key(run))
        if other is None:
            continue
        matched += 1
        for metric in gaps:
            gaps[metric] = max(gaps[metric], abs(run.metric("policy", metric)[0] - other.metric("policy", metric)[0]))
    return (f"Ranked DPO and DPO on the same rankings of 2, at the same learning rate: {matched} pairs of runs "
            f"(seeds x training lengths); largest difference in gold reward {gaps['gold_reward']:.3g}, in KL "
            f"{gaps['kl']:.3g}.")


def agreement_markdown(runs: Path) -> str:
    """Question (g): each automatic metric's agreement with the gold preference (ties half), 95% interval
    clustered by ranking, over the pairs it can judge; the same metrics appear in each judge's run."""
    rows: dict[str, dict] = {}
    for path in sorted((runs / "agreement").glob("*/agreement.json")):
        rows.update(json.loads(path.read_text())["agreement"])
    lines = ["| metric | agreement with gold | 95% CI | pairs |", "|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda item: -(item[1].get("agreement") or 0)):
        if row.get("agreement") is not None:
            lines.append(f"| {name} | {row['agreement']:.3f} | [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['n']} |")
    return "\n".join(lines) if rows else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--choose-lr", action="store_true", help="write lr.json from the lr part")
    parser.add_argument("--quick", action="store_true", help="the quick subset's runs (run.py --quick)")
    args = parser.parse_args(argv)
    if args.choose_lr:
        choose_lrs()
        return
    runs, where = (RUNS.with_name("study_quick"), HERE / "quick") if args.quick else (RUNS, HERE)
    decisions, results, kept = [], [], []
    for part, plan in PLAN.items():
        if (runs / part).exists():
            decisions += analyse(runs, part, plan, where / "report" / part)
        elif (where / "report" / part / "comparisons.csv").exists():
            # not rerun here: its decisions from the report its runs wrote (committed), said in decisions.md
            print(f"[study] part {part}: no runs in {runs / part}; its decisions from report/{part}/", flush=True)
            decisions += decide(part, plan, where / "report" / part)
            kept.append(part)
        else:
            print(f"[study] part {part}: no runs yet", flush=True)
            continue
        for row in read_csv(where / "report" / part / "results.csv"):
            results.append({"part": part, **row})
    if results:
        header = list(dict.fromkeys(k for row in results for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header)
        writer.writeheader()
        writer.writerows(results)
        (where / "results.csv").write_text(buffer.getvalue())
    text = ["# Decisions", "", "Every matched-KL comparison of the study, with its paired t-test over common seeds, "
            "Holm's adjustment within its part (the family size in brackets) and the verdict of the README's rules "
            f"(better / worse: Holm p < 0.05; no better: the interval lies below +{MARGIN}; else inconclusive). "
            "Written by `python experiments/study/analyze.py`.", ""]
    primary = [r for r in decisions if r["part"] in ("ranking", "primary") and (r["first"], r["second"]) == PRIMARY[1:3]
               and r["quantity"].endswith(f"KL {PRIMARY[3]:g}")]
    if primary:
        text += ["## The primary comparison", "", markdown(primary), ""]
    times = json.loads((where / "wall_times.json").read_text()) if (where / "wall_times.json").exists() else {}
    for part in PLAN:
        rows = [r for r in decisions if r["part"] == part]
        if rows:
            text += [f"## {part}", ""]
            if part in kept:
                finished = times.get(part, {}).get("finished", "earlier")
                text += [f"Not rerun with the parts above (no runs of it in `multirun/study/`): from "
                         f"`report/{part}/comparisons.csv`, written by its runs (finished {finished}).", ""]
            if PLAN[part].get("bonferroni"):
                text += [f"Its column \"p (Holm, family)\" is {PLAN[part]['bonferroni']} x p (Bonferroni over the ranking "
                         "part's family, which these comparisons belong to), an upper bound of the Holm-adjusted p.", ""]
            text += [markdown(rows), ""]
    check = k2_check(runs)
    if check:
        text += ["## The k = 2 check", "", check, ""]
    agreement = agreement_markdown(runs)
    if agreement:
        text += ["## agreement (g)", "", agreement, ""]
    (where / "decisions.md").write_text("\n".join(text))
    table = frontier_markdown(where, decisions)
    if table:
        (where / "report" / "frontier" / "table.md").write_text(
            "# The frontier part: every method against DPO at matched KL\n\nWritten by `python "
            "experiments/study/analyze.py` from `report/frontier/matched_kl.csv`, `lr.json` and `decisions.md`: gold "
            "reward, mean over 5 seeds [95% t-interval]; \"-\" where a seed's frontier does not reach the KL (never "
            "extrapolated).\n\n" + table + "\n")
    print(f"[study] {len(decisions)} comparisons; wrote {where / 'decisions.md'} and {where / 'results.csv'}")


if __name__ == "__main__":
    main()
