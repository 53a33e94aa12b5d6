"""The DPO paper's Fig. 2 left on real text: SmolLM2-135M, movie reviews, a sentiment judge as gold reward.

    make assets                                   # once: the model, the reviews, the judge (offline)
    python experiments/imdb/run.py                # every arm, in order (resumable: a rerun skips done jobs)
    python experiments/imdb/run.py --arms dpo_beta0.1 ppo
    python experiments/imdb/run.py --probe        # the timing probe: one job of each kind, its CPU time
    python experiments/imdb/run.py --pilot        # the pilot: questions 2 and 3 at a small size (about 1.5 h)
    python experiments/imdb/run.py --report       # tables, plots and comparisons from what ran

Each arm is one Hydra multirun of ``experiment=imdb/frontier`` (its protocol: conf/experiment/imdb/frontier.yaml)
with the arm's overrides, written to ``multirun/imdb/<arm>``; its sweep is over the arm's budget and the seeds.
A stopped run continues where it stopped: completed jobs are skipped (``jobs.jsonl``), the SFT policy, the
sampled preferences and the reference log-probs are cached. Wall times go to ``wall_times.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alignexp.metrics.seeds import holm, seeds_for_half_width, verdict
from alignexp.sweeps import watch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = REPO / "multirun" / "imdb"
PYTHON = os.environ.get("PYTHON", sys.executable)
SEEDS = "seed=0,1,2"
STEPS = "train.max_steps=8,16,32,64"


@dataclass
class Arm:
    name: str
    overrides: list[str]
    folder: str = ""  # the sweep's folder under the output folder (default: the arm's name)

    @property
    def sweep(self) -> str:
        return self.folder or self.name


ARMS = [
    Arm("dpo_beta0.05", ["loss=dpo", "loss.beta=0.05", STEPS, SEEDS]),
    Arm("dpo_beta0.1", ["loss=dpo", "loss.beta=0.1", STEPS, SEEDS]),
    Arm("dpo_beta0.5", ["loss=dpo", "loss.beta=0.5", STEPS, SEEDS]),
    # Ranked DPO on the same rankings of 4 (Plackett-Luce over all 4 responses) at beta 0.1.
    Arm("ranked_dpo", ["loss=ranked_dpo", "loss.beta=0.1", STEPS, SEEDS]),
    # Preferred-FT: SFT on each prompt's best sample.
    Arm("preferred_ft", ["loss=preferred_ft", STEPS, SEEDS]),
    # PPO with the gold judge as its reward (rollouts of 32 prompts per iteration).
    Arm("ppo", ["loss=ppo", "train.max_steps=1", "ppo.steps=4,8,16,32", "ppo.kl_coef=0.1", SEEDS]),
    # Best-of-N of the SFT policy under the gold judge, at its analytic KL log N - (N - 1) / N.
    Arm("best_of_n", ["sampler=best_of_n", "sampler.n=2,4,16", "train.max_steps=1", SEEDS]),
]
PROBE = [
    Arm("probe_dpo", ["loss=dpo", "train.max_steps=8", "seed=0"]),
    Arm("probe_ppo", ["loss=ppo", "train.max_steps=1", "ppo.steps=2", "seed=0"]),
    Arm("probe_best_of_n", ["sampler=best_of_n", "sampler.n=4", "train.max_steps=1", "seed=0"]),
]
COMPARE = ["dpo_beta0.1:ppo", "dpo_beta0.1:preferred_ft", "ranked_dpo:dpo_beta0.1"]
KL_POINTS = ["0.5", "1", "2"]

# The pilot (README "The pilot"): questions 2 and 3 at a size that runs in about 1.5 hours on the 2 cores. The
# frontier's protocol with a smaller SFT set (the quick run's 384 windows), 128 training prompts, 128 held-out
# prompts, budgets of 4, 8 and 16 steps, 3 seeds; compared at KL 0.5 and 1.
PILOT_OUT = REPO / "multirun" / "imdb_pilot"
PILOT_STEPS = "train.max_steps=4,8,16"
PILOT = ["task.n_sft=384", "task.n_train_prompts=128", "task.n_eval_prompts=128"]
PILOT_ARMS = [
    Arm("dpo_beta0.1", ["loss=dpo", "loss.beta=0.1", PILOT_STEPS, SEEDS, *PILOT]),
    Arm("preferred_ft", ["loss=preferred_ft", PILOT_STEPS, SEEDS, *PILOT]),
    Arm("ranked_dpo", ["loss=ranked_dpo", "loss.beta=0.1", PILOT_STEPS, SEEDS, *PILOT]),
    # The pilot's second stage, question 1 (README "The pilot's second stage"; added after the first stage's runs,
    # its protocol written before its own): PPO with the gold judge, 2, 4 and 8 iterations of 32 rollouts.
    Arm("ppo", ["loss=ppo", "train.max_steps=1", "ppo.steps=2,4,8", "ppo.kl_coef=0.1", SEEDS, *PILOT]),
]
PILOT_ARMS += [
    # The pilot's third stage (README "The pilot's third stage"; added after the second stage's results, its
    # protocol written before its own runs): seeds 3 and 4 of every arm, each in a folder of its own (a sweep's
    # jobs are numbered by position, so the first stages' folders are left as they ran), and Preferred-FT's
    # budget doubled once, to 32 steps on all 5 seeds, so that its frontier reaches KL 1.
    *(Arm(arm.name, [o if o != SEEDS else "seed=3,4" for o in arm.overrides], f"{arm.name}-seeds3-4")
      for arm in PILOT_ARMS),
    Arm("preferred_ft", ["loss=preferred_ft", "train.max_steps=32", "seed=0,1,2,3,4", *PILOT], "preferred_ft-32steps"),
]
PILOT_COMPARE = ["dpo_beta0.1:preferred_ft", "ranked_dpo:dpo_beta0.1", "dpo_beta0.1:ppo"]
PILOT_KL_POINTS = ["0.5", "1"]
# The decision rules (README "Questions and decision rules", "The pilot's third stage"): the matched-KL comparisons
# are one family under Holm's correction; better/worse at adjusted p < ALPHA (the pilot's third stage is a second
# look at its questions: 0.05 halved); no better where the whole 95% interval lies below +MARGIN log-odds.
ALPHA, PILOT_ALPHA, MARGIN = 0.05, 0.025, 0.05
PLANNED_HALF_WIDTH = 0.1  # verdicts.md: the seeds a comparison would need for an interval of +-0.1 log-odds


def command(arm: Arm, out: Path = OUT) -> list[str]:
    return [PYTHON, "-m", "alignexp.train", "-m", "experiment=imdb/frontier", f"run_name={arm.name}",
            *arm.overrides, f"hydra.sweep.dir={out / arm.sweep}"]


def run_arm(arm: Arm, log: Path, out: Path = OUT) -> dict[str, float]:
    """The arm's multirun; its wall and CPU time (of the child processes) in seconds."""
    print(f"[imdb] {arm.sweep}: {' '.join(command(arm, out)[2:])}", flush=True)
    start, cpu = time.time(), os.times()
    with log.open("a") as handle:
        process = subprocess.Popen(command(arm, out), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                        "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"})
        code = watch(process, out / arm.sweep, f"[imdb] {arm.sweep}")
    end = os.times()
    if code != 0:
        raise SystemExit(f"[imdb] {arm.sweep} failed (exit {code}); see {log}")
    return {"wall_s": round(time.time() - start, 1),
            "cpu_s": round(end.children_user + end.children_system - cpu.children_user - cpu.children_system, 1)}


def report(pilot: bool = False) -> None:
    out, folder = (PILOT_OUT, HERE / "pilot" / "report") if pilot else (OUT, HERE / "report")
    pairs, kls, alpha = (PILOT_COMPARE, PILOT_KL_POINTS, PILOT_ALPHA) if pilot else (COMPARE, KL_POINTS, ALPHA)
    ran = {path.parent.name.split("-")[0] for path in out.glob("*/jobs.jsonl")}  # compare the arms that have runs
    compare = [pair for pair in pairs if set(pair.split(":")) <= ran]
    command = [PYTHON, "-m", "alignexp.report", str(out), "--out", str(folder), "--kl", *kls, "--compare", *compare]
    print("[imdb] " + " ".join(command[2:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    text = verdicts(folder / "comparisons.csv", pairs, kls, alpha)  # every pair asked: the unrun ones as missing
    (folder / "verdicts.md").write_text(text)
    print(text + f"[imdb] wrote {folder / 'verdicts.md'}", flush=True)


def verdicts(comparisons: Path, pairs: list[str], kls: list[str], alpha: float) -> str:
    """The questions' verdicts from the report's matched-KL comparisons: every pair at every KL is one family
    under Holm's correction; a pair at a KL that the report could not compare (a frontier that does not reach it
    on a seed) is listed as missing and is not in the family."""
    rows = {(r["first"], r["second"], r["quantity"]): r for r in csv.DictReader(comparisons.read_text().splitlines())
            if r["where"] == "matched KL"}
    asked = [(pair, kl, rows.get((*pair.split(":"), f"gold_reward at KL {kl}"))) for pair in pairs for kl in kls]
    made = [row for _, _, row in asked if row is not None]
    adjusted = iter(holm([float(row["p_value"]) for row in made]))  # in the order of ``made``, as read below
    target = f"{PLANNED_HALF_WIDTH:g}"
    lines = [f"Matched-KL comparisons of the gold reward, paired over seeds; Holm's correction over the {len(made)} "
             f"made; better/worse at adjusted p < {alpha:g}, no better where the 95% interval lies below "
             f"+{MARGIN:g}. Half-width: half the interval's width, about the smallest difference these seeds could "
             f"call before Holm's correction. Seeds for +-{target}: how many seeds the same spread of the per-seed "
             f"differences would need for a half-width of {target}.",
             "", f"| comparison | KL | difference [95% CI] | half-width | seeds for +-{target} | p | p (Holm) | seeds "
             "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for pair, kl, row in asked:
        name = pair.replace(":", " - ")
        if row is None:
            lines.append(f"| {name} | {kl} | | | | | | missing: a frontier does not reach KL {kl} on every seed |")
            continue
        difference, low, high, p = float(row["difference"]), float(row["ci_low"]), float(row["ci_high"]), next(adjusted)
        half = (high - low) / 2
        lines.append(f"| {name} | {kl} | {difference:+.3f} [{low:+.3f}, {high:+.3f}] | {half:.3f} | "
                     f"{seeds_for_half_width(half, int(row['n_seeds']), PLANNED_HALF_WIDTH)} | "
                     f"{float(row['p_value']):.3g} | {p:.3g} | {row['seeds']} | "
                     f"{verdict(difference, high, p, MARGIN, alpha)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="*", help=", ".join(a.name for a in ARMS))
    parser.add_argument("--probe", action="store_true", help="one job of each kind (the timing probe)")
    parser.add_argument("--pilot", action="store_true", help="the pilot: questions 2 and 3 at a small size")
    parser.add_argument("--report", action="store_true", help="only the report of what ran")
    args = parser.parse_args()
    if args.report:
        report(args.pilot)
        return
    if args.probe:
        arms, out, times_file = PROBE, OUT, HERE / "probe_times.json"
    elif args.pilot:
        arms, out, times_file = PILOT_ARMS, PILOT_OUT, HERE / "pilot" / "wall_times.json"
    else:
        arms, out, times_file = ARMS, OUT, HERE / "wall_times.json"
    arms = [a for a in arms if not args.arms or a.name in args.arms]
    out.mkdir(parents=True, exist_ok=True)
    times_file.parent.mkdir(parents=True, exist_ok=True)
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    for arm in arms:
        took = run_arm(arm, out / "run.log", out)
        times[arm.sweep] = {**took, "overrides": arm.overrides}
        times_file.write_text(json.dumps(times, indent=2) + "\n")
    if not args.probe:
        report(args.pilot)


if __name__ == "__main__":
    main()
