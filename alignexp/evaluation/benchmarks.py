"""Benchmarks through EleutherAI's lm-evaluation-harness, used as a library (the optional ``benchmarks``
extra): a policy and its reference on the same tasks, and their paired per-item difference with its
standard error. Named presets hold the Open LLM Leaderboard's task sets, each version named;
``include_path`` adds local task folders (offline use). ``python -m alignexp.evaluate mode=benchmarks``;
docs/evaluation.md.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignexp.args import check_choice, check_number
from alignexp.errors import AlignexpError, ConfigError

# (task, num_fewshot or None for the task's own, headline metric as lm-evaluation-harness names it)
PRESETS: dict[str, list[tuple[str, int | None, str]]] = {
    # The Open LLM Leaderboard as of 2023 (v1; Beeching et al.): ARC 25-shot, HellaSwag 10-shot, MMLU
    # 5-shot, TruthfulQA MC2 0-shot, Winogrande 5-shot, GSM8K 5-shot.
    "open_llm_leaderboard_v1": [("arc_challenge", 25, "acc_norm,none"), ("hellaswag", 10, "acc_norm,none"),
                                ("mmlu", 5, "acc,none"), ("truthfulqa_mc2", 0, "acc,none"),
                                ("winogrande", 5, "acc,none"), ("gsm8k", 5, "exact_match,strict-match")],
    # The Open LLM Leaderboard from June 2024 (v2): IFEval, BBH, MATH level 5, GPQA, MuSR, MMLU-Pro, each
    # with the shots of its lm-evaluation-harness task (the harness's ``leaderboard`` group).
    "open_llm_leaderboard_v2": [("leaderboard_ifeval", None, "prompt_level_strict_acc,none"),
                                ("leaderboard_bbh", None, "acc_norm,none"),
                                ("leaderboard_math_hard", None, "exact_match,none"),
                                ("leaderboard_gpqa", None, "acc_norm,none"),
                                ("leaderboard_musr", None, "acc_norm,none"),
                                ("leaderboard_mmlu_pro", None, "acc,none")],
}
EXTRA = "pip install -e '.[benchmarks]' (lm-evaluation-harness)"


@dataclass
class BenchmarkArgs:
    """``benchmarks`` (conf/evaluate.yaml): a ``preset`` and/or ``tasks`` (lm-evaluation-harness task or
    group names), local task folders (``include_path``; ``builtin_tasks: false`` indexes only those,
    which is faster), ``num_fewshot`` for every task (null: the preset's, else the task's own), ``limit``
    (documents per task, or a fraction; null: all), the harness's batch size and maximum length, chat
    template, and the few-shot sampling seed."""

    preset: str | None = None
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    builtin_tasks: bool = True
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    max_length: int | None = None
    apply_chat_template: bool = False
    fewshot_seed: int = 1234

    def __post_init__(self) -> None:
        self.tasks = [str(t) for t in (self.tasks or [])]
        if self.preset is not None:
            check_choice("benchmarks.preset", self.preset, tuple(PRESETS))
        check_number("benchmarks.num_fewshot", self.num_fewshot, low=0, integer=True, optional=True)
        check_number("benchmarks.limit", self.limit, low=0, low_open=True, optional=True)
        check_number("benchmarks.batch_size", self.batch_size, low=1, integer=True)
        check_number("benchmarks.max_length", self.max_length, low=1, integer=True, optional=True)

    def plan(self) -> list[tuple[str, int | None, str | None]]:
        """(task, shots, headline metric) for the preset's tasks, then ``tasks``; shots: ``num_fewshot``
        where set, else the preset's, else None (the task's own)."""
        planned = [(name, shots, metric) for name, shots, metric in PRESETS.get(self.preset or "", [])]
        planned += [(name, None, None) for name in self.tasks if name not in {p[0] for p in planned}]
        if not planned:
            raise ConfigError("benchmarks.tasks: mode=benchmarks needs benchmarks.preset=<"
                              f"{'|'.join(PRESETS)}> or benchmarks.tasks=[<lm-evaluation-harness task>, ...]")
        return [(name, self.num_fewshot if self.num_fewshot is not None else shots, metric)
                for name, shots, metric in planned]


def task_manager(args: BenchmarkArgs) -> Any:
    """lm-evaluation-harness's TaskManager over its own tasks (unless ``builtin_tasks`` is false) and
    ``include_path``; an error naming the extra where the harness is not installed."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise AlignexpError(f"mode=benchmarks needs lm-evaluation-harness: {EXTRA}") from None
    if args.include_path is None and not args.builtin_tasks:
        raise ConfigError("benchmarks.builtin_tasks=false indexes only benchmarks.include_path, which is not set")
    return TaskManager(include_path=args.include_path, include_defaults=args.builtin_tasks)


def check_tasks(manager: Any, args: BenchmarkArgs) -> list[tuple[str, int | None, str | None]]:
    """The plan, every task name checked against the harness's index before any model is loaded."""
    planned = args.plan()
    known = set(manager.all_tasks)
    missing = [name for name, _, _ in planned if name not in known]
    if missing:
        where = f" or in benchmarks.include_path={args.include_path}" if args.include_path else ""
        raise ConfigError(f"benchmarks.tasks: no lm-evaluation-harness task {', '.join(missing)}{where}")
    return planned


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(child, group_subtasks)]


def item_scores(results: dict, name: str) -> dict[str, dict[tuple[str, int], float]]:
    """Per-item scores of task or group ``name`` from a ``simple_evaluate`` result with its samples:
    ``{"acc,none": {(leaf task, doc_id): 1.0, ...}}`` (metrics whose per-item values are numbers)."""
    out: dict[str, dict[tuple[str, int], float]] = {}
    for leaf in _leaves(name, results.get("group_subtasks") or {}):
        for sample in results.get("samples", {}).get(leaf, []):
            for metric in sample.get("metrics", []):
                value = _number(sample.get(metric))
                if value is not None:
                    out.setdefault(f"{metric},{sample.get('filter', 'none')}", {})[(leaf, sample["doc_id"])] = value
    return out


def _mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def paired(policy: dict[tuple[str, int], float], reference: dict[tuple[str, int], float]) -> dict[str, Any]:
    """Policy and reference means over the items both have, each ± its standard error, and the mean
    per-item difference d_i = policy_i - reference_i ± sd(d) / sqrt(n) (a paired comparison: the items'
    own difficulty cancels)."""
    items = sorted(set(policy) & set(reference))
    if not items:
        return {"n": 0}
    p, r = [policy[i] for i in items], [reference[i] for i in items]
    out: dict[str, Any] = {"n": len(items)}
    for key, values in (("policy", p), ("reference", r), ("difference", [a - b for a, b in zip(p, r)])):
        out[key], out[f"{key}_stderr"] = _mean_stderr(values)
    return out


def evaluate_model(path: str, names: Sequence[tuple[str, int | None]], manager: Any, args: BenchmarkArgs,
                   device: str, dtype: str, seed: int) -> dict[str, dict]:
    """``simple_evaluate`` results (with samples) of the Hugging Face folder ``path`` on the tasks, one
    harness call per number of shots, by task name."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(path), device=device, dtype=dtype, batch_size=args.batch_size,
              max_length=args.max_length)
    out: dict[str, dict] = {}
    for shots in sorted({k for _, k in names}, key=lambda k: -1 if k is None else k):
        tasks = [name for name, k in names if k == shots]
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, task_manager=manager,
                                          limit=args.limit, log_samples=True, bootstrap_iters=0,
                                          apply_chat_template=args.apply_chat_template, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=args.fewshot_seed)
        if results is None:
            raise AlignexpError(f"lm-evaluation-harness returned no results for {', '.join(tasks)}")
        for name in tasks:
            out[name] = results
    del lm
    gc.collect()
    return out


def compare(policy_results: dict[str, dict], reference_results: dict[str, dict],
            planned: Sequence[tuple[str, int | None, str | None]]) -> dict[str, dict]:
    """Per task: its shots (as the harness ran them), the headline metric, and every per-item metric
    paired between policy and reference (:func:`paired`)."""
    out = {}
    for name, _, headline in planned:
        ours, theirs = item_scores(policy_results[name], name), item_scores(reference_results[name], name)
        metrics = {key: paired(values, theirs.get(key, {})) for key, values in sorted(ours.items())}
        if not metrics:
            raise AlignexpError(f"benchmark task {name}: no per-item scores that are numbers to compare")
        n_shot = policy_results[name].get("n-shot", {})
        shots = {leaf: n_shot.get(leaf) for leaf in _leaves(name, policy_results[name].get("group_subtasks") or {})}
        out[name] = {"num_fewshot": sorted({s for s in shots.values() if s is not None}) or None,
                     "headline": headline if headline in metrics else next(iter(metrics)),
                     "n": max(m["n"] for m in metrics.values()), "metrics": metrics}
    return out


def run_benchmarks(policy: str, reference: str, args: BenchmarkArgs, manager: Any, device: str, dtype: str,
                   seed: int = 0) -> dict[str, Any]:
    """eval.json's ``benchmarks`` section: the policy and its reference on the planned tasks, paired
    (``manager``: :func:`task_manager`'s)."""
    import lm_eval

    planned = check_tasks(manager, args)
    names = [(name, shots) for name, shots, _ in planned]
    policy_results = evaluate_model(policy, names, manager, args, device, dtype, seed)
    reference_results = evaluate_model(reference, names, manager, args, device, dtype, seed)
    return {"preset": args.preset, "lm_eval_version": getattr(lm_eval, "__version__", None),
            "policy_path": str(policy), "reference_path": str(reference), "limit": args.limit,
            "tasks": compare(policy_results, reference_results, planned)}


def format_benchmarks(section: dict[str, Any]) -> str:
    """The benchmarks as a table: task, headline metric, reference, policy, difference (± stderr), n."""
    lines = [f"{'benchmark':<28}{'metric':<28}{'reference':>18}{'policy':>18}{'difference':>20}{'n':>7}"]

    def cell(value: float | None, stderr: float | None) -> str:
        return "-" if value is None else f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")

    for name, task in section["tasks"].items():
        m = task["metrics"][task["headline"]]
        lines.append(f"{name:<28}{task['headline']:<28}{cell(m.get('reference'), m.get('reference_stderr')):>18}"
                     f"{cell(m.get('policy'), m.get('policy_stderr')):>18}"
                     f"{cell(m.get('difference'), m.get('difference_stderr')):>20}{m['n']:>7}")
    return "\n".join(lines)
