"""A policy against its reference on the task's held-out prompts (:func:`evaluate_policy`).

Per sampling temperature: gold reward or judge score, the sequence-level KL estimate, text metrics
against the task's references, lengths and win rates judged in both orders; once: implicit-reward
accuracy on held-out rankings, and best-of-N from the reference. docs/evaluation.md defines each metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from alignexp.args import EvalArgs
from alignexp.distributed import shard_map
from alignexp.errors import AlignexpError, ConfigError
from alignexp.metrics.overlap import reference_metrics
from alignexp.metrics.preference import labelled_pairs, ranking_accuracy
from alignexp.metrics.reward import best_of_n_indices, best_of_n_kl, length_stats
from alignexp.metrics.stats import clustered_summary, summary
from alignexp.metrics.winrate import Judge, batched, both_orders_verdicts, win_rate, win_rate_from_verdicts
from alignexp.models.logprobs import EncodedExample, encode_example, encode_text
from alignexp.models.reference import response_logps
from alignexp.sampling.engine import Generation, SamplingParams
from alignexp.sampling.text import decode, sample_responses
from alignexp.tasks.base import RankedExample, Task, Text
from alignexp.tasks.loading import DataUnavailable

log = logging.getLogger("alignexp.evaluation")

UNAVAILABLE = (DataUnavailable, FileNotFoundError, KeyError, NotImplementedError)
"""What a task raises when optional evaluation data (held-out rankings, references) cannot be had."""


def scores_cheaply(judge: Judge | None) -> bool:
    """Whether per-response scores are worth computing for every sample (not for an LLM judge's API calls)."""
    return judge is not None and hasattr(judge, "score") and getattr(judge, "name", "") != "llm"


# -- sampling and log-probs --------------------------------------------------------------------------
def sample(model, tokenizer, prompts: Sequence[Text], n: int, params: SamplingParams, args: EvalArgs,
           desc: str) -> list[list[Generation]]:
    """n generations per prompt in chunks (a tqdm bar); prompt i keeps its own random streams. On N ranks
    the chunks are sharded over the ranks and gathered in order (the one-process samples exactly)."""
    chunk = max(1, args.batch_size // n)
    starts = range(0, len(prompts), chunk)
    parts = shard_map(lambda i: sample_responses(model, tokenizer, prompts[starts[i]:starts[i] + chunk], n, params,
                                                 seed=args.seed, max_prompt_len=args.max_prompt_len,
                                                 batch_size=args.batch_size, first_index=starts[i]),
                      len(starts), desc if args.progress else None)
    return [row for part in parts for row in part]


def sample_texts(model, tokenizer, prompts: Sequence[Text], n: int, args: EvalArgs, desc: str) -> list[list[str]]:
    """n decoded samples per prompt at temperature 1 (held-out rankings, best-of-N)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    return [[decode(tokenizer, g) for g in row] for row in sample(model, tokenizer, prompts, n, params, args, desc)]


def encode_generations(tokenizer, prompts: Sequence[Text], generations: Sequence[Sequence[Generation]],
                       max_prompt_len: int) -> list[EncodedExample]:
    """Prompts with their generated token ids as responses (exactly the sampled tokens, EOS included)."""
    return [EncodedExample(encode_text(tokenizer, p, is_prompt=True)[-max_prompt_len:],
                           [list(g.token_ids) for g in row]) for p, row in zip(prompts, generations)]


def implicit_rewards(policy, reference, encoded: Sequence[EncodedExample], pad_id: int, beta: float,
                     batch_size: int) -> list[list[float]]:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO, Rafailov et al. 2023, eq. 5), per response."""
    pi = response_logps(policy, encoded, pad_id, batch_size)
    ref = response_logps(reference, encoded, pad_id, batch_size)
    return [[beta * (a - b) for a, b in zip(ra.tolist(), rb.tolist())] for ra, rb in zip(pi, ref)]


def judge_scores(judge: Judge, prompts: Sequence[Text], candidates: Sequence[Sequence[Text]], args: EvalArgs,
                 desc: str) -> list[list[float]]:
    """The judge's score of every candidate of every prompt, in batches, as one row per prompt."""
    flat = batched(judge.score, [p for p, row in zip(prompts, candidates) for _ in row],
                   [c for row in candidates for c in row], batch_size=args.batch_size, desc=desc,
                   progress=args.progress)
    rows, k = [], 0
    for row in candidates:
        rows.append(flat[k:k + len(row)])
        k += len(row)
    return rows


# -- held-out rankings ---------------------------------------------------------------------------------
def heldout_rankings(task: Task, reference, tokenizer, args: EvalArgs) -> list[RankedExample]:
    """The task's held-out rankings with 2 or more responses (at most ``args.max_preference_examples``):
    sampled from the reference (temperature 1) on the eval prompts and labelled by the task where it
    samples its preferences, read from its held-out split elsewhere."""
    if task.samples_preferences:
        def sample_fn(prompts: list[Text], n: int) -> list[list[str]]:
            return sample_texts(reference, tokenizer, prompts, n, args, "held-out rankings")

        examples = task.preference_examples(args.preference_split or "eval", sample_fn=sample_fn)
    else:
        examples = task.preference_examples(args.preference_split or task.eval_split)
    examples = [ex for ex in examples if ex.n >= 2]
    if args.max_preference_examples is not None:
        examples = examples[: args.max_preference_examples]
    return examples


def preference_metrics(policy, reference, tokenizer, task: Task, judge: Judge | None, args: EvalArgs,
                       max_response_len: int) -> tuple[dict, dict, dict]:
    """``preference_accuracy`` (and the implicit-reward margin) of policy and reference, and the judge's
    accuracy on the same held-out rankings. Returns (policy metrics, reference metrics, comparisons)."""
    try:
        examples = heldout_rankings(task, reference, tokenizer, args)
    except UNAVAILABLE as error:
        # data unavailable offline, or a task without held-out rankings: skipped unless asked for by name
        if args.preference_split is not None:
            raise
        log.warning("preference accuracy skipped: %s", error)
        return {}, {}, {"preference_accuracy_skipped": str(error)}
    if not examples:
        return {}, {}, {"preference_accuracy_skipped": "no held-out rankings with 2 or more responses"}
    encoded = [encode_example(tokenizer, ex, args.max_prompt_len, max_response_len) for ex in examples]
    labels = [ex.scores for ex in examples]
    rewards = implicit_rewards(policy, reference, encoded, tokenizer.pad_token_id, args.beta, args.batch_size)
    margins = [row[i] - row[j] for row, ex in zip(rewards, examples) for i, j in labelled_pairs(ex.n, ex.scores)]
    clusters = [k for k, ex in enumerate(examples) for _ in labelled_pairs(ex.n, ex.scores)]  # pairs by ranking
    policy_metrics = {**ranking_accuracy(rewards, labels), **clustered_summary("implicit_reward_margin", margins,
                                                                                 clusters)}
    zeros = [[0.0] * len(row) for row in rewards]  # the reference's implicit reward is 0 for every response
    reference_metrics_ = {**ranking_accuracy(zeros, labels),
                          **clustered_summary("implicit_reward_margin", [0.0] * len(margins), clusters)}
    comparisons: dict[str, Any] = {"preference_examples": len(examples)}
    if scores_cheaply(judge):
        rows = judge_scores(judge, [ex.prompt for ex in examples], [ex.responses for ex in examples], args,
                            f"scoring held-out rankings ({judge.name})")
        comparisons.update(ranking_accuracy(rows, labels, prefix="judge_preference_accuracy"))
    return policy_metrics, reference_metrics_, comparisons


# -- the evaluation ------------------------------------------------------------------------------------
def _text_metrics(judge: Judge | None, task: Task, prompts: Sequence[Text], texts: Sequence[str],
                  generations: Sequence[Generation], references: Sequence[Text] | None,
                  baseline_texts: Sequence[Text] | None, args: EvalArgs, use_references: bool) -> dict[str, Any]:
    """Per-model metrics of one set of samples (no log-probs)."""
    out: dict[str, Any] = {}
    if task.has_gold_reward:
        out.update(summary("gold_reward", [task.gold_reward(p, t) for p, t in zip(prompts, texts)]))
    if judge is not None and judge.name != "gold" and scores_cheaply(judge):
        out.update(summary("judge_score", batched(judge.score, prompts, texts, batch_size=args.batch_size,
                                                  desc=f"scoring ({judge.name})", progress=args.progress)))
    out.update(length_stats(texts, [len(g.token_ids) for g in generations], [g.finished for g in generations]))
    if use_references and references is not None:
        out.update(reference_metrics(texts, references, bootstrap=args.bootstrap, seed=args.seed))
    if baseline_texts is not None and judge is not None:
        out.update(win_rate(judge, prompts, texts, baseline_texts, prefix="win_rate_vs_dataset",
                            batch_size=args.batch_size, progress=args.progress))
    return out


def best_of_n(reference, tokenizer, prompts: Sequence[Text], judge: Judge, task: Task,
              args: EvalArgs) -> list[dict[str, float]]:
    """Best-of-N from the reference at temperature 1, selected by the judge's score, for each N of
    ``args.best_of_n`` (the N candidates of the largest N serve every smaller one)."""
    n_max = max(args.best_of_n)
    texts = sample_texts(reference, tokenizer, prompts, n_max, args, f"best-of-{n_max} samples")
    scores = judge_scores(judge, prompts, texts, args, f"best-of-N scoring ({judge.name})")
    out = []
    for n in sorted(set(args.best_of_n)):
        chosen = best_of_n_indices(scores, n)
        picks = [row[i] for row, i in zip(texts, chosen)]
        entry: dict[str, float] = {"n": n, "kl": best_of_n_kl(n)}
        if task.has_gold_reward:
            entry.update(summary("gold_reward", [task.gold_reward(p, t) for p, t in zip(prompts, picks)]))
        if judge.name != "gold":
            entry.update(summary("judge_score", [row[i] for row, i in zip(scores, chosen)]))
        out.append(entry)
    return out


def _at_temperature(policy, reference, tokenizer, task: Task, judge: Judge | None, args: EvalArgs,
                    temperature: float, prompts: Sequence[Text], references: Sequence[Text] | None,
                    baseline: str, use_references: bool) -> dict[str, Any]:
    """One temperature's samples of policy and reference, their metrics and comparisons."""
    params = SamplingParams(temperature=float(temperature), max_new_tokens=args.max_new_tokens)
    generations = {who: [row[0] for row in sample(model, tokenizer, prompts, 1, params, args,
                                                  f"sampling {who} (T={temperature:g})")]
                   for who, model in (("policy", policy), ("reference", reference))}
    texts = {who: [decode(tokenizer, g) for g in gens] for who, gens in generations.items()}
    encoded = encode_generations(tokenizer, prompts, [[g] for g in generations["policy"]], args.max_prompt_len)
    log_ratio = [row[0] for row in implicit_rewards(policy, reference, encoded, tokenizer.pad_token_id, 1.0,
                                                    args.batch_size)]
    dataset_baseline = references if baseline == "dataset" else None
    result: dict[str, Any] = {}
    for who in ("policy", "reference"):
        metrics = _text_metrics(judge, task, prompts, texts[who], generations[who], references,
                                dataset_baseline, args, use_references)
        kl = log_ratio if who == "policy" else [0.0] * len(prompts)
        result[who] = {**metrics, **summary("kl", kl)}
    if baseline == "dataset":
        comparisons = {k.replace("win_rate_vs_dataset", "win_rate_vs_reference"): v
                       for k, v in result["policy"].items() if k.startswith("win_rate_vs_dataset")}
    elif judge is not None:
        forward, swapped = both_orders_verdicts(judge, prompts, texts["policy"], texts["reference"],
                                                args.batch_size, args.progress)
        comparisons = win_rate_from_verdicts(forward, swapped, prefix="win_rate_vs_reference")
    else:
        comparisons = {}
    comparisons.update({"judge": judge.name if judge is not None else None,
                        "baseline": "dataset" if baseline == "dataset" else "reference_samples"})
    result["comparisons"] = comparisons
    result["examples"] = [{"prompt": p, "policy": a, "reference": b}
                          for p, a, b in list(zip(prompts, texts["policy"], texts["reference"]))[:args.n_examples]]
    return result


def evaluate_policy(policy, reference, tokenizer, task: Task, args: EvalArgs, judge: Judge | None = None,
                    max_response_len: int | None = None) -> dict:
    """Sample policy and reference on the held-out prompts and measure them (docs/evaluation.md).

    ``judge``: the run's judge (:func:`alignexp.judges.build_judge`), or None for no judge (no win
    rates; the gold reward and the text metrics still run). The headline ``policy``/``reference``/
    ``comparisons`` are those at temperature 1.0 (or the first listed); each is under ``by_temperature``.
    """
    start_time = time.time()
    examples = task.eval_examples()
    if not examples:
        raise AlignexpError(f"task {task.name}: no evaluation examples")
    prompts = [ex.prompt for ex in examples]
    references = [ex.target if ex.target is not None else ex.responses[0] for ex in examples] \
        if all(ex.responses or ex.target is not None for ex in examples) else None
    baseline = args.baseline if args.baseline != "auto" else \
        ("reference" if task.has_gold_reward else "dataset")
    if baseline == "dataset" and references is None:
        raise ConfigError(f"eval.baseline=dataset: task {task.name} has no reference responses")
    use_references = (not task.has_gold_reward) if args.reference_metrics == "auto" else bool(args.reference_metrics)
    max_response_len = max_response_len or args.max_new_tokens

    timings: dict[str, float] = {}
    pref_policy: dict = {}
    pref_reference: dict = {}
    pref_comparisons: dict = {}
    if args.preference_accuracy:
        t0 = time.time()
        pref_policy, pref_reference, pref_comparisons = preference_metrics(
            policy, reference, tokenizer, task, judge, args, max_response_len)
        timings["preference_accuracy"] = time.time() - t0

    by_temperature: dict[str, dict] = {}
    for temperature in args.temperatures:
        t0 = time.time()
        by_temperature[f"{float(temperature):g}"] = _at_temperature(
            policy, reference, tokenizer, task, judge, args, temperature, prompts, references, baseline,
            use_references)
        timings[f"T={float(temperature):g}"] = time.time() - t0

    best: list[dict] = []
    if args.best_of_n and hasattr(judge, "score"):
        t0 = time.time()
        best = best_of_n(reference, tokenizer, prompts, judge, task, args)
        timings["best_of_n"] = time.time() - t0

    key = "1" if "1" in by_temperature else next(iter(by_temperature))
    headline = by_temperature[key]
    result = {"n_prompts": len(prompts), "temperature": float(key),
              "policy": {**headline["policy"], **pref_policy},
              "reference": {**headline["reference"], **pref_reference},
              "comparisons": {**headline["comparisons"], **pref_comparisons},
              "by_temperature": by_temperature}
    if best:
        result["best_of_n"] = best
    timings["total"] = time.time() - start_time
    result["eval_seconds"] = timings
    log.info("evaluation: %.1fs (%s)", timings["total"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return result
