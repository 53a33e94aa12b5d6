"""A policy against its reference on the task's held-out prompts (:func:`evaluate_policy`).

Per sampling temperature: gold reward or judge score, the sequence-level KL estimate, text metrics
against the task's references, lengths and win rates judged in both orders (each with its
length-controlled twin), and every prompt's values (``per_prompt``, the file beside eval.json); once:
implicit-reward accuracy on held-out rankings, and best-of-N from the reference. :func:`measure` is
shared with the prompting baselines. docs/evaluation.md defines each metric.
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
from alignexp.metrics.winrate import (
    Judge,
    batched,
    both_orders_verdicts,
    both_orders_wins,
    char_lengths,
    win_rate_from_verdicts,
)
from alignexp.models.logprobs import EncodedExample, encode_example, encode_text
from alignexp.models.reference import response_logps
from alignexp.sampling.engine import Generation, SamplingParams
from alignexp.sampling.text import decode, generated_tokens, sample_responses
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
           desc: str, backend=None) -> list[list[Generation]]:
    """n generations per prompt in chunks (a tqdm bar); prompt i keeps its own random streams. On N ranks
    the chunks are sharded over the ranks and gathered in order (the one-process samples exactly).
    ``backend``: None samples ``model`` with the HF engine; a backend (vLLM) is given its weights first."""
    if backend is not None:
        backend.sync_weights(model)
    chunk = max(1, args.batch_size // n)
    starts = range(0, len(prompts), chunk)
    parts = shard_map(lambda i: sample_responses(model, tokenizer, prompts[starts[i]:starts[i] + chunk], n, params,
                                                 seed=args.seed, max_prompt_len=args.max_prompt_len,
                                                 batch_size=args.batch_size, first_index=starts[i], backend=backend),
                      len(starts), desc if args.progress else None,
                      items=[len(prompts[s:s + chunk]) for s in starts], unit="prompt", tokens=generated_tokens)
    return [row for part in parts for row in part]


def sample_texts(model, tokenizer, prompts: Sequence[Text], n: int, args: EvalArgs, desc: str,
                 backend=None) -> list[list[str]]:
    """n decoded samples per prompt at temperature 1 (held-out rankings, best-of-N)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    rows = sample(model, tokenizer, prompts, n, params, args, desc, backend)
    return [[decode(tokenizer, g) for g in row] for row in rows]


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
def heldout_rankings(task: Task, reference, tokenizer, args: EvalArgs, backend=None) -> list[RankedExample]:
    """The task's held-out rankings with 2 or more responses (at most ``args.max_preference_examples``):
    sampled from the reference (temperature 1) on the eval prompts and labelled by the task where it
    samples its preferences, read from its held-out split elsewhere."""
    if task.samples_preferences:
        def sample_fn(prompts: list[Text], n: int) -> list[list[str]]:
            return sample_texts(reference, tokenizer, prompts, n, args, "held-out rankings", backend)

        examples = task.preference_examples(args.preference_split or task.eval_split, sample_fn=sample_fn)
    else:
        examples = task.preference_examples(args.preference_split or task.eval_split)
    examples = [ex for ex in examples if ex.n >= 2]
    if args.max_preference_examples is not None:
        examples = examples[: args.max_preference_examples]
    return examples


def preference_metrics(policy, reference, tokenizer, task: Task, judge: Judge | None, args: EvalArgs,
                       max_response_len: int, backend=None) -> tuple[dict, dict, dict]:
    """``preference_accuracy`` (and the implicit-reward margin) of policy and reference, and the judge's
    accuracy on the same held-out rankings. Returns (policy metrics, reference metrics, comparisons)."""
    try:
        examples = heldout_rankings(task, reference, tokenizer, args, backend)
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
Columns = dict[str, list]
"""Per-prompt values by name (one list entry per prompt), kept in the per-prompt file beside eval.json."""


def judged(judge: Judge, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text], prefix: str,
           args: EvalArgs) -> tuple[dict[str, Any], Columns]:
    """The both-orders win rate of ``first`` over ``second`` with its length-controlled twin, and the
    per-prompt verdicts: ``prefix`` (w_i), ``prefix_forward``, ``prefix_swapped``."""
    forward, swapped = both_orders_verdicts(judge, prompts, first, second, args.batch_size, args.progress)
    metrics = win_rate_from_verdicts(forward, swapped, prefix, char_lengths(first), char_lengths(second))
    return metrics, {prefix: both_orders_wins(forward, swapped), f"{prefix}_forward": forward,
                     f"{prefix}_swapped": swapped}


def _text_metrics(judge: Judge | None, task: Task, prompts: Sequence[Text], texts: Sequence[str],
                  generations: Sequence[Generation], references: Sequence[Text] | None,
                  baseline_texts: Sequence[Text] | None, args: EvalArgs,
                  use_references: bool) -> tuple[dict[str, Any], Columns]:
    """Per-model metrics of one set of samples (no log-probs), and their per-prompt values."""
    out: dict[str, Any] = {}
    columns: Columns = {"text": list(texts), "chars": char_lengths(texts),
                        "tokens": [len(g.token_ids) for g in generations]}
    if task.has_gold_reward:
        columns["gold_reward"] = task.gold_rewards(prompts, texts)
        out.update(summary("gold_reward", columns["gold_reward"]))
    if judge is not None and judge.name != "gold" and scores_cheaply(judge):
        columns["judge_score"] = batched(judge.score, prompts, texts, batch_size=args.batch_size,
                                         desc=f"scoring ({judge.name})", progress=args.progress)
        out.update(summary("judge_score", columns["judge_score"]))
    out.update(length_stats(texts, columns["tokens"], [g.finished for g in generations]))
    if use_references and references is not None:
        out.update(reference_metrics(texts, references, bootstrap=args.bootstrap, seed=args.seed))
    if baseline_texts is not None and judge is not None:
        metrics, verdict_columns = judged(judge, prompts, texts, baseline_texts, "win_rate_vs_dataset", args)
        out.update(metrics)
        columns.update(verdict_columns)
    return out, columns


Samples = dict[str, tuple[list[str], list[Generation]]]
"""Each model's samples by role (``policy``, ``reference``): decoded texts and generations, one per prompt."""


def measure(judge: Judge | None, task: Task, prompts: Sequence[Text], samples: Samples,
            references: Sequence[Text] | None, baseline: str, args: EvalArgs, use_references: bool) -> dict:
    """One temperature's samples measured: each model's metrics, the policy against the baseline (the
    reference's samples, or with ``baseline="dataset"`` the task's references) under ``comparisons``, a
    few ``examples``, and ``per_prompt`` rows (lengths, verdicts, rewards of every prompt)."""
    dataset_baseline = references if baseline == "dataset" else None
    result: dict[str, Any] = {}
    columns: Columns = {}
    for who, (texts, generations) in samples.items():
        result[who], own = _text_metrics(judge, task, prompts, texts, generations, references, dataset_baseline,
                                         args, use_references)
        columns.update({f"{who}_{name}": values for name, values in own.items()})
    comparisons: dict[str, Any] = {}
    if baseline == "dataset":
        comparisons = {k.replace("win_rate_vs_dataset", "win_rate_vs_reference"): v
                       for k, v in result["policy"].items() if k.startswith("win_rate_vs_dataset")}
        columns["dataset_chars"] = char_lengths(references)
    elif judge is not None and "reference" in samples:
        comparisons, verdict_columns = judged(judge, prompts, samples["policy"][0], samples["reference"][0],
                                              "win_rate_vs_reference", args)
        columns.update(verdict_columns)
    comparisons.update({"judge": judge.name if judge is not None else None,
                        "baseline": "dataset" if baseline == "dataset" else "reference_samples"})
    result["comparisons"] = comparisons
    result["examples"] = [{"prompt": p, **{who: texts[i] for who, (texts, _) in samples.items()}}
                          for i, p in enumerate(prompts[:args.n_examples])]
    # each row names its prompt and, where the task has one, its reference text (``target``), so that the file
    # reads on its own
    result["per_prompt"] = [{"index": i, "prompt": prompts[i],
                             **({"target": references[i]} if references is not None else {}),
                             **{name: values[i] for name, values in columns.items()}}
                            for i in range(len(prompts))]
    return result


def sample_decoded(model, tokenizer, prompts: Sequence[Text], params: SamplingParams, args: EvalArgs,
                   desc: str, backend=None) -> tuple[list[str], list[Generation]]:
    """One generation per prompt and its text."""
    generations = [row[0] for row in sample(model, tokenizer, prompts, 1, params, args, desc, backend)]
    return [decode(tokenizer, g) for g in generations], generations


def best_of_n(reference, tokenizer, prompts: Sequence[Text], judge: Judge, task: Task,
              args: EvalArgs, backend=None) -> list[dict[str, float]]:
    """Best-of-N from the reference at temperature 1, selected by the judge's score, for each N of
    ``args.best_of_n`` (the N candidates of the largest N serve every smaller one)."""
    n_max = max(args.best_of_n)
    texts = sample_texts(reference, tokenizer, prompts, n_max, args, f"best-of-{n_max} samples", backend)
    scores = judge_scores(judge, prompts, texts, args, f"best-of-N scoring ({judge.name})")
    out = []
    for n in sorted(set(args.best_of_n)):
        chosen = best_of_n_indices(scores, n)
        picks = [row[i] for row, i in zip(texts, chosen)]
        entry: dict[str, float] = {"n": n, "kl": best_of_n_kl(n)}
        if task.has_gold_reward:
            entry.update(summary("gold_reward", task.gold_rewards(prompts, picks)))
        if judge.name != "gold":
            entry.update(summary("judge_score", [row[i] for row, i in zip(scores, chosen)]))
        out.append(entry)
    return out


def _at_temperature(policy, reference, tokenizer, task: Task, judge: Judge | None, args: EvalArgs,
                    temperature: float, prompts: Sequence[Text], references: Sequence[Text] | None,
                    baseline: str, use_references: bool, backend=None) -> dict[str, Any]:
    """One temperature's samples of policy and reference, their metrics, comparisons and KL."""
    params = SamplingParams(temperature=float(temperature), max_new_tokens=args.max_new_tokens)
    samples = {who: sample_decoded(model, tokenizer, prompts, params, args, f"sampling {who} (T={temperature:g})",
                                   backend) for who, model in (("policy", policy), ("reference", reference))}
    encoded = encode_generations(tokenizer, prompts, [[g] for g in samples["policy"][1]], args.max_prompt_len)
    log_ratio = [row[0] for row in implicit_rewards(policy, reference, encoded, tokenizer.pad_token_id, 1.0,
                                                    args.batch_size)]
    result = measure(judge, task, prompts, samples, references, baseline, args, use_references)
    result["policy"].update(summary("kl", log_ratio))
    result["reference"].update(summary("kl", [0.0] * len(prompts)))
    for row, value in zip(result["per_prompt"], log_ratio):
        row["policy_log_ratio"] = value
    return result


def eval_setup(task: Task, args: EvalArgs) -> tuple[list[Text], list[Text] | None, str, bool]:
    """(held-out prompts, their reference responses or None, the win rate's baseline, whether the text
    metrics run against the references), checked."""
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
    return prompts, references, baseline, use_references


def headline(by_temperature: dict[str, dict], n_prompts: int, extra: dict[str, dict] | None = None) -> dict:
    """The result: the headline ``policy``/``reference``/``comparisons`` (temperature 1.0, else the first)
    merged with ``extra``'s sections, every temperature under ``by_temperature``, and ``per_prompt``
    (each temperature's rows, which write_eval_json moves to the per-prompt file)."""
    per_prompt = [{"temperature": float(t), **row} for t, entry in by_temperature.items()
                  for row in entry.pop("per_prompt", [])]
    key = "1" if "1" in by_temperature else next(iter(by_temperature))
    top = by_temperature[key]
    extra = extra or {}
    return {"n_prompts": n_prompts, "temperature": float(key),
            **{section: {**top.get(section, {}), **extra.get(section, {})} for section in ("policy", "reference",
                                                                                  "comparisons")},
            "by_temperature": by_temperature, "per_prompt": per_prompt}


def evaluate_policy(policy, reference, tokenizer, task: Task, args: EvalArgs, judge: Judge | None = None,
                    max_response_len: int | None = None, backend=None) -> dict:
    """Sample policy and reference on the held-out prompts and measure them (docs/evaluation.md).
    ``backend``: what samples (None: the HF engine on each model; vLLM: given each model's weights in turn).

    ``judge``: the run's judge (:func:`alignexp.judges.build_judge`), or None for no judge (no win
    rates; the gold reward and the text metrics still run). The headline ``policy``/``reference``/
    ``comparisons`` are those at temperature 1.0 (or the first listed); each is under ``by_temperature``.
    """
    start_time = time.time()
    prompts, references, baseline, use_references = eval_setup(task, args)
    max_response_len = max_response_len or args.max_new_tokens

    timings: dict[str, float] = {}
    pref_policy: dict = {}
    pref_reference: dict = {}
    pref_comparisons: dict = {}
    if args.preference_accuracy:
        t0 = time.time()
        pref_policy, pref_reference, pref_comparisons = preference_metrics(
            policy, reference, tokenizer, task, judge, args, max_response_len, backend)
        timings["preference_accuracy"] = time.time() - t0

    by_temperature: dict[str, dict] = {}
    for temperature in args.temperatures:
        t0 = time.time()
        by_temperature[f"{float(temperature):g}"] = _at_temperature(
            policy, reference, tokenizer, task, judge, args, temperature, prompts, references, baseline,
            use_references, backend)
        timings[f"T={float(temperature):g}"] = time.time() - t0

    best: list[dict] = []
    if args.best_of_n and hasattr(judge, "score"):
        t0 = time.time()
        best = best_of_n(reference, tokenizer, prompts, judge, task, args, backend)
        timings["best_of_n"] = time.time() - t0

    result = headline(by_temperature, len(prompts), {"policy": pref_policy, "reference": pref_reference,
                                                     "comparisons": pref_comparisons})
    if best:
        result["best_of_n"] = best
    timings["total"] = time.time() - start_time
    result["eval_seconds"] = timings
    log.info("evaluation: %.1fs (%s)", timings["total"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return result
