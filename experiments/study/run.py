"""The study: which RL-free method aligns best, and does ranked DPO beat DPO at equal KL?

    python experiments/study/run.py                 # every part, in order (resumable: a rerun skips done jobs)
    python experiments/study/run.py --parts controls lr
    python experiments/study/run.py --parts primary  # the ranking part's primary comparison alone (not by default)
    python experiments/study/run.py --quick         # a quick subset: the positive controls on 2 seeds
    python experiments/study/analyze.py             # tables, plots and decisions from what ran

Each part is a list of arms; an arm is one Hydra multirun of ``experiment=study/<part>`` (its protocol and
its sweep over training steps and seeds, conf/experiment/study/) with the arm's own overrides, written to
``multirun/study/<part>/<arm>``. Learning rates come from the ``lr`` part, chosen on the task's validation
prompts (``lr.json``); parts after it read them. Wall times go to ``wall_times.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignexp.sweeps import watch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = REPO / "multirun" / "study"
PYTHON = os.environ.get("PYTHON", str(REPO / ".venv" / "bin" / "python"))
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3)
LR_BEYOND = {LR_GRID[0]: 1e-5, LR_GRID[-1]: 3e-3}  # tried where a method's choice is at an edge of the grid
KL_BUDGET = 2.0  # the objective of the learning-rate choice: validation gold reward at KL <= 2 nats

# The trainable methods, each as the overrides that make it. RAFT trains 2 rounds, so its steps per round are
# halved (the same budget of optimizer steps in all); PPO's budget is its iterations (ppo.steps).
METHODS: dict[str, list[str]] = {
    "preferred_ft": ["loss=preferred_ft"],
    "dpo": ["loss=dpo"],
    "cdpo": ["loss=cdpo"],
    "ipo": ["loss=ipo"],
    "slic": ["loss=slic"],
    "rrhf": ["loss=rrhf"],
    "pro": ["loss=pro"],
    "lipo": ["loss=lipo"],
    "ranked_dpo": ["loss=ranked_dpo"],
    "rso": ["sampler=rso", "loss=dpo", "pairs=first_round"],
    "raft": ["sampler=raft", "loss=raft", "sampler.iterations=2", "train.max_steps=4,8,16,32,64,2"],
    # The methods of issue 24 (docs/methods.md), each at its defaults (conf/loss/), its learning rate chosen as above.
    "simpo": ["loss=simpo"],
    "ranked_simpo": ["loss=ranked_simpo"],
    "cpo": ["loss=cpo"],
    "orpo": ["loss=orpo"],
    "rpo": ["loss=rpo"],
    "apo_zero": ["loss=apo_zero"],
    "apo_down": ["loss=apo_down"],
    "nca": ["loss=nca"],
    "exo": ["loss=exo"],
    "robust": ["loss=robust"],
    "bco": ["loss=bco"],
    "sppo_hard": ["loss=sppo_hard"],
    "discopop": ["loss=discopop"],
    "aot": ["loss=aot"],
    "dpo_norm": ["loss=dpo", "loss.length_normalize=true"],
    "dpo_forward_kl": ["loss=dpo", "loss.f_divergence=forward_kl"],
    "dpo_js": ["loss=dpo", "loss.f_divergence=js_divergence"],
    "dpo_alpha": ["loss=dpo", "loss.f_divergence=alpha_divergence"],
    "dpo_sft_mix": ["loss=mix"],  # dpo 0.8 + sft 0.2
    # KTO on binary labels made from the same samples: each ranking's best desirable, the rest not; and each
    # sample judged alone, desirable at a gold reward >= 0.07 (the SFT policy's mean)
    "kto": ["loss=kto"],
    "kto_gold": ["loss=kto", "task.binary_threshold=0.07"],
}
TUNED = [name for name in METHODS]
# Variants of the synthetic task tried for the positive controls (README "The proving ground").
VARIANTS: dict[str, list[str]] = {
    "noisy": ["task.tau=0.5"],
    "long": ["task.min_len=24", "task.max_len=48", "model.max_response_len=64", "eval.max_new_tokens=64"],
    "pairs": ["task.n_responses=2"],
}
PRIMARY_ARMS = ("ranked_dpo_k2_both", "dpo_k2_both", "ranked_dpo_k4_prompts", "dpo_best_worst_k4_prompts")
SFT = "<sft>"  # in an arm's overrides: the SFT policy's folder (sft_policy), filled in when the arm runs
RM_RUN = OUT / "reward_model"
EXTERNAL_RUN = OUT / "bootstrap" / "external_policy"


@dataclass
class Arm:
    """One multirun of ``experiment=study/<part>`` (or one run, ``single``): ``name`` (its run_name and
    folder) and its own overrides; ``lr_of``: use the learning rate chosen for that method."""

    name: str
    overrides: list[str]
    lr_of: str | None = None
    single: Path | None = None
    evaluate: bool = False  # a `python -m alignexp.evaluate` run (its own overrides), in ``single``
    folder: str | None = None  # its sweep's folder under the part's (default: ``name``)


@dataclass
class Part:
    name: str
    arms: list[Arm] = field(default_factory=list)
    experiment: str | None = None  # its ``experiment=study/<experiment>`` (default: ``name``)
    by_default: bool = True  # run by ``run.py`` without ``--parts``


def chosen_lrs() -> dict[str, float]:
    path = HERE / "lr.json"
    if not path.exists():
        raise SystemExit("lr.json is missing: run the lr part first (python experiments/study/run.py --parts lr)")
    return {k: v["lr"] for k, v in json.loads(path.read_text()).items()}


def method(name: str, *extra: str, arm: str | None = None) -> Arm:
    """The method ``name`` at its chosen learning rate, with ``extra`` overrides (later ones win)."""
    return Arm(arm or name, [*METHODS[name], *extra], lr_of=name)


def parts(quick: bool) -> list[Part]:
    seeds3, seeds5 = "seed=0,1,2", "seed=0,1,2,3,4"
    if quick:
        return [Part("controls", [Arm("dpo", ["loss=dpo", "seed=0,1", "train.max_steps=16,64"]),
                                  Arm("dpo_32_prompts", ["loss=dpo", "task.n_train_prompts=32", "seed=0,1",
                                                         "train.max_steps=16,64"])])]
    controls = Part("controls", [
        Arm("dpo", ["loss=dpo"]),
        Arm("dpo_32_prompts", ["loss=dpo", "task.n_train_prompts=32"]),
        Arm("preferred_ft", ["loss=preferred_ft"]),
        Arm("best_of_n", ["sampler=best_of_n", "sampler.n=2,4,8,16", "train.max_steps=1"]),
    ])
    # Task variants tried for the positive controls (README "The proving ground"): each the controls' DPO,
    # DPO on 32 prompts and Preferred-FT, at 3 seeds.
    variants = Part("variants")
    for variant, task in VARIANTS.items():
        variants.arms += [Arm(f"dpo_{variant}", ["loss=dpo", *task]),
                          Arm(f"dpo_32_prompts_{variant}", ["loss=dpo", *task, "task.n_train_prompts=32"]),
                          Arm(f"preferred_ft_{variant}", ["loss=preferred_ft", *task])]
    lr = Part("lr", [Arm(name, [*METHODS[name][:1], *METHODS[name][1:], f"train.lr={','.join(map(str, LR_GRID))}"])
                     for name in TUNED])
    reward_model = Part("reward_model", [Arm("reward_model", ["loss=reward", "seed=100"], single=RM_RUN)])
    frontier = Part("frontier", [method(name, seeds5) for name in METHODS] + [
        Arm("best_of_n", ["sampler=best_of_n", "sampler.n=2,4,8,16,64", "train.max_steps=1", seeds5]),
        Arm("ppo", ["loss=ppo", "train.max_steps=1", "ppo.steps=4,8,16,32", seeds5]),
        Arm("ppo_reward_model", ["loss=ppo", "train.max_steps=1", "ppo.steps=4,8,16,32", "judge@ppo.judge=reward_model",
                                 f"ppo.judge.path={RM_RUN / 'reward_model'}", seeds5]),
    ])
    ranking = Part("ranking")
    for k in (2, 3, 4, 6, 8):
        for budget, prompts in (("prompts", 512), ("labels", 1024 // k)):
            if budget == "labels" and k == 2:
                continue  # the same runs as the fixed-prompts arm
            common = [f"task.ranking_length={k}", f"task.n_train_prompts={prompts}", seeds5]
            suffix = f"k{k}_{budget if k > 2 else 'both'}"
            ranking.arms.append(method("ranked_dpo", *common, arm=f"ranked_dpo_{suffix}"))
            if k == 2:  # the check: DPO on the same pairs at ranked DPO's learning rate gives the same runs
                ranking.arms.append(Arm(f"dpo_{suffix}", [*METHODS["dpo"], *common], lr_of="ranked_dpo"))
            for pairs in (("best_worst", "adjacent", "all") if k > 2 else ()):
                ranking.arms.append(method("dpo", *common, f"pairs={pairs}", arm=f"dpo_{pairs}_{suffix}"))
    # The primary comparison alone (with the k = 2 check), on the ranking part's protocol and budgets: the
    # ranking part's four arms that answer the question, rerun with their own folder when the whole part
    # (34 arms) cannot be (issue 24 added the 4- and 8-step budgets for it).
    primary = Part("primary", [arm for arm in ranking.arms if arm.name in PRIMARY_ARMS], experiment="ranking",
                   by_default=False)
    noise = Part("noise")
    for tau in (0.0, 0.1, 0.3, 1.0):
        for name in ("dpo", "ranked_dpo", "pro", "rrhf", "lipo"):
            noise.arms.append(method(name, f"task.tau={tau}", seeds3, arm=f"{name}_tau{tau:g}"))
        for name in ("dpo", "ranked_dpo"):
            noise.arms.append(method(name, f"task.tau={tau}", "task.ranking_length=2", seeds3,
                                     arm=f"{name}_k2_tau{tau:g}"))
    rso = Part("rso", [method("rso", seeds3),
                       method("rso", "sampler.beta=1000000.0", seeds3, arm="sft_sample_rank")])
    bootstrap = Part("bootstrap", [
        Arm("external_policy", ["loss=dpo", "seed=100", "train.max_steps=128"], lr_of="dpo", single=EXTERNAL_RUN),
        method("pro", "train.max_steps=32,64,128", seeds3),  # as many steps as 2 rounds of the others
        method("pro", "sampler=self_bootstrap", seeds3, arm="pro_self_bootstrap"),
        method("pro", "sampler=self_bootstrap", f"sampler.source={EXTERNAL_RUN / 'policy'}", seeds3,
               arm="pro_external"),
    ])
    feedback = Part("feedback")
    labels = {"gold": [], "reward_model": ["sampler=relabel", "judge@sampler.judge=reward_model",
                                           f"sampler.judge.path={RM_RUN / 'reward_model'}"],
              "noisy_judge": ["sampler=relabel", "judge@sampler.judge=noisy_gold", "sampler.judge.noise=0.2"]}
    for name in ("dpo", "ranked_dpo"):
        for source, overrides in labels.items():
            feedback.arms.append(method(name, *overrides, seeds3, arm=f"{name}_{source}"))
    # (g): how often automatic metrics agree with the gold preference, on the evaluation prompts' rankings of
    # 4 reference samples with exact gold labels (tau 0); the metrics' references are the task's demonstrations.
    sft = f"reference={SFT}"  # the SFT policy's folder, read when the arm runs (after the controls part)
    agreement = Part("agreement", [
        Arm("reward_model", [sft, "task.tau=0", "judge=reward_model", f"judge.path={RM_RUN / 'reward_model'}"],
            single=OUT / "agreement" / "reward_model", evaluate=True),
        Arm("noisy_judge", [sft, "task.tau=0", "judge=noisy_gold", "judge.noise=0.2"],
            single=OUT / "agreement" / "noisy_judge", evaluate=True),
    ])
    return [controls, variants, lr, reward_model, frontier, ranking, primary, noise, rso, bootstrap, feedback,
            agreement]


def sft_policy() -> str:
    """The cached SFT policy every part starts from, read from a run of the controls part."""
    record = OUT / "controls" / "dpo" / "0" / "eval.json"
    if not record.exists():
        raise SystemExit(f"the SFT policy is read from {record}: run the controls part first (--parts controls ...)")
    return json.loads(record.read_text())["init_from"]


def command(part: Part, arm: Arm, lrs: dict[str, float] | None) -> list[str]:
    """``python -m alignexp.train [-m] experiment=study/<part> run_name=<arm> [train.lr=...] <overrides>``."""
    if arm.evaluate:
        overrides = [o.replace(SFT, sft_policy()) if SFT in o else o for o in arm.overrides]
        return [PYTHON, "-m", "alignexp.evaluate", "mode=agreement", *overrides, f"hydra.run.dir={arm.single}"]
    lr = [f"train.lr={lrs[arm.lr_of]}"] if arm.lr_of and lrs is not None else []
    base = [f"experiment=study/{part.experiment or part.name}", f"run_name={arm.name}", *lr, *arm.overrides]
    if arm.single is not None:
        return [PYTHON, "-m", "alignexp.train", *base, f"hydra.run.dir={arm.single}"]
    return [PYTHON, "-m", "alignexp.train", "-m", *base, f"hydra.sweep.dir={sweep_folder(part, arm)}",
            "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]


def sweep_folder(part: Part, arm: Arm) -> Path:
    return OUT / part.name / (arm.folder or arm.name)


def run_part(part: Part, log: Path) -> float:
    lrs = chosen_lrs() if any(arm.lr_of for arm in part.arms) else None
    start, ran = time.time(), 0
    for index, arm in enumerate(part.arms, 1):
        label = f"[study] {part.name}/{arm.name} (arm {index} of {len(part.arms)})"
        if arm.single is not None and any((arm.single / name).exists() for name in ("eval.json", "agreement.json")):
            print(f"{label}: done before, skipped", flush=True)
            continue
        cmd = command(part, arm, lrs)
        print(f"{label}: {' '.join(cmd[2:])}", flush=True)
        with log.open("a") as handle:
            process = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                            "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"})
            code = process.wait() if arm.single is not None else watch(process, sweep_folder(part, arm), label)
        if code != 0:
            raise SystemExit(f"{label} failed (exit {code}); see {log}")
        elapsed, ran = time.time() - start, ran + 1
        print(f"{label}: {elapsed / 60:.1f} min into the part, about "
              f"{elapsed / ran * (len(part.arms) - index) / 60:.0f} min to go", flush=True)
    return time.time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=None, help="which parts (default: all, in order)")
    parser.add_argument("--quick", action="store_true", help="a quick subset: two positive controls, 2 seeds")
    args = parser.parse_args(argv)
    todo = parts(args.quick)
    if args.parts:
        unknown = sorted(set(args.parts) - {p.name for p in todo})
        if unknown:
            raise SystemExit(f"unknown part(s) {unknown}; parts: {', '.join(p.name for p in todo)}")
        todo = [p for p in todo if p.name in args.parts]
    else:
        todo = [p for p in todo if p.by_default]
    names = {p.name for p in todo}
    for part in todo:  # a part whose arms read the reward model's run needs it first (or done before)
        uses_rm = any(str(RM_RUN) in " ".join(arm.overrides) for arm in part.arms)
        if uses_rm and "reward_model" not in names and not (RM_RUN / "eval.json").exists():
            raise SystemExit(f"part {part.name} reads the reward model of the reward_model part ({RM_RUN}), which "
                             f"has not run: add it, e.g. --parts reward_model {' '.join(args.parts or [])}")
    global OUT
    if args.quick:  # the quick subset's runs apart from the study's
        OUT = OUT.with_name("study_quick")
    OUT.mkdir(parents=True, exist_ok=True)
    times_path = HERE / ("quick/wall_times.json" if args.quick else "wall_times.json")
    times_path.parent.mkdir(parents=True, exist_ok=True)
    for part in todo:
        seconds = run_part(part, OUT / f"{part.name}.log")
        if part.name == "lr" and not args.quick:
            subprocess.run([sys.executable, str(HERE / "analyze.py"), "--choose-lr"], check=True, cwd=REPO)
            beyond = beyond_the_grid(part)
            if beyond.arms:
                seconds += run_part(beyond, OUT / "lr.log")
                subprocess.run([sys.executable, str(HERE / "analyze.py"), "--choose-lr"], check=True, cwd=REPO)
        times = json.loads(times_path.read_text()) if times_path.exists() else {}  # another part may have written
        times[part.name] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M")}
        times_path.write_text(json.dumps(times, indent=2) + "\n")
        print(f"[study] part {part.name}: {seconds / 60:.1f} min", flush=True)


def beyond_the_grid(lr: Part) -> Part:
    """The learning rate one step past the grid's edge (LR_BEYOND), for each method whose chosen rate is
    at that edge, run as the lr part runs (its own sweep, ``multirun/study/lr/<method>/beyond``); the
    choice is then made again over the grid and that rate."""
    part = Part("lr")
    for name, record in json.loads((HERE / "lr.json").read_text()).items():
        beyond = LR_BEYOND.get(record["lr"])
        if beyond is None:
            continue
        arm = next(arm for arm in lr.arms if arm.name == name)
        overrides = [o for o in arm.overrides if not o.startswith("train.lr=")]  # the grid's rates, replaced
        part.arms.append(Arm(name, [*overrides, f"train.lr={beyond}"], folder=f"{name}/beyond"))
    return part


if __name__ == "__main__":
    main()
