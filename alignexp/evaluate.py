"""Evaluation of a policy against its reference on the task's held-out prompts -> ``eval.json``.

Run at the end of ``python -m alignexp.train`` (:func:`evaluate_policy`), or on its own::

    python -m alignexp.evaluate policy=outputs/.../policy [reference=FOLDER] [task=...] [eval.judge=...]
    python -m alignexp.evaluate mode=agreement task=tldr task.path=... [agreement.judges=[reward_model]]
    python -m alignexp.evaluate mode=export policy=FOLDER export.alpaca_eval=eval.json export.mt_bench=question.jsonl

**mode=policy** (the default). Per sampling temperature (``eval.temperatures``; 0 is greedy), one
sample per held-out prompt from the policy and from the reference (the same random stream per
prompt for both), and for each of them:

* ``gold_reward`` (tasks with a gold reward): mean r*(x, y), ± stderr; ``judge_score`` for another
  scoring judge (a reward model);
* ``kl``: the sequence-level estimate of KL(pi || pi_ref), mean over the policy's samples of
  log pi(y|x) - log pi_ref(y|x), ± stderr (unbiased at temperature 1; the log-ratio's mean under the
  tempered policy otherwise; 0 for the reference);
* ``bleu``, ``chrf``, ``ter`` (corpus level, with sacrebleu's signature) and ``rouge_1/2/l`` (mean
  F-measure ± stderr), all 0-100, against the task's reference responses (``eval.reference_metrics``;
  ``auto``: tasks without a gold reward);
* length statistics (tokens, words, characters; the fraction cut by ``eval.max_new_tokens``);
* ``win_rate_vs_dataset`` where the baseline is the dataset's reference response;

and under ``comparisons``: ``win_rate_vs_reference``, the policy against the baseline
(``eval.baseline``: the reference policy's samples, or the dataset's reference responses: the human
summary, the reference translation, the preferred response; ``auto``: the reference's samples on tasks
with a gold reward, the dataset's responses elsewhere) under ``eval.judge``, each pair judged in both
orders (:mod:`alignexp.metrics.winrate`), ties half, ± stderr, with the judge's position bias.

Once (temperature-free): ``preference_accuracy``, how often the implicit reward
beta * log(pi/pi_ref) orders held-out rankings as their labels do (the synthetic task's held-out
rankings are sampled from the reference on the eval prompts and labelled as in training), and
``comparisons.judge_preference_accuracy``, the same for the judge's scores (a reward model's accuracy;
the gold reward's shows the label noise). ``eval.best_of_n`` adds best-of-N sampling from the
reference, selected by the judge's score, at its analytic KL log N - (N-1)/N (temperature 1).

The headline ``policy``/``reference``/``comparisons`` are those at temperature 1.0 (or the first
listed); every temperature is under ``by_temperature``.

**mode=agreement**: metric-human agreement on a labelled preference set (see :func:`agreement_report`).
**mode=export**: AlpacaEval / MT-Bench answer files, and MT-Bench grading (see :mod:`alignexp.exports`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from alignexp.config import CONF_DIR
from alignexp.judges.base import verdicts
from alignexp.metrics.overlap import plain_text, reference_metrics, sentence_bleu, sentence_rouge
from alignexp.metrics.preference import (
    LabelledPair,
    agreement,
    labelled_pairs,
    pairs_from_rankings,
    prompt_key,
    ranking_accuracy,
)
from alignexp.metrics.reward import best_of_n_indices, best_of_n_kl, length_stats
from alignexp.metrics.stats import summary
from alignexp.metrics.winrate import Judge, batched, both_orders_verdicts, win_rate, win_rate_from_verdicts
from alignexp.models.logprobs import EncodedExample, encode_example, encode_text
from alignexp.models.reference import compute_ref_logps
from alignexp.sampling.engine import Generation, SamplingParams
from alignexp.sampling.text import decode, sample_responses
from alignexp.tasks.base import RankedExample, Text
from alignexp.tasks.loading import DataUnavailable

log = logging.getLogger("alignexp.evaluate")

BASELINES = ("auto", "reference", "dataset")


@dataclass
class EvalArgs:
    """What ``conf/eval/*.yaml`` gives (plus ``max_prompt_len`` from the model and ``beta`` from the loss).

    Attributes:
        temperatures: sampling temperatures (0 = greedy); the DPO paper's sweep is 0, 0.25, ..., 1.
        max_new_tokens: cap on generated tokens per response.
        batch_size: prompts per generation / log-prob batch.
        seed: base of the per-prompt random streams (the same for policy and reference).
        judge: ``gold`` (tasks with a gold reward), ``reward_model`` or ``llm`` (alignexp/judges/).
        judge_args: keyword arguments of the judge (a reward model's path, an LLM endpoint...).
        baseline: what the win rate is against: ``reference`` samples, the ``dataset``'s reference
            responses, or ``auto`` (reference samples on tasks with a gold reward, the dataset elsewhere).
        reference_metrics: BLEU/chrF/TER/ROUGE against the references: true, false or ``auto``
            (tasks without a gold reward).
        bootstrap: resamples for 95% intervals of the corpus metrics (0: none).
        preference_accuracy: measure implicit-reward (and judge) accuracy on held-out rankings.
        preference_split: the task's split of held-out rankings (null: the task's ``eval_split``,
            ``eval`` for the synthetic task).
        max_preference_examples: use at most this many held-out rankings (null: all).
        beta: the implicit reward's beta (reported margins scale with it; accuracy does not).
        best_of_n: N values for best-of-N from the reference (e.g. [4, 16]); empty: none.
        n_examples: sample texts kept per temperature in eval.json.
        progress: tqdm bars for generation and judging.
    """

    temperatures: Sequence[float] = (1.0,)
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 1234
    max_prompt_len: int = 512
    judge: str = "gold"
    judge_args: dict = field(default_factory=dict)
    baseline: str = "auto"
    reference_metrics: bool | str = "auto"
    bootstrap: int = 0
    preference_accuracy: bool = True
    preference_split: str | None = None
    max_preference_examples: int | None = 256
    beta: float = 1.0
    best_of_n: Sequence[int] = ()
    n_examples: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ValueError("eval.temperatures: give at least one temperature")
        for t in self.temperatures:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
                raise ValueError(f"eval.temperatures must be numbers >= 0, got {t!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"eval.baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.reference_metrics not in (True, False, "auto"):
            raise ValueError(f"eval.reference_metrics must be true, false or auto, got {self.reference_metrics!r}")
        for n in self.best_of_n:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"eval.best_of_n must be integers >= 1, got {n!r}")
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_preference_examples is not None and self.max_preference_examples < 1:
            raise ValueError(f"eval.max_preference_examples must be >= 1 or null, got {self.max_preference_examples}")
        if self.bootstrap < 0:
            raise ValueError(f"eval.bootstrap must be >= 0, got {self.bootstrap}")

    @classmethod
    def from_config(cls, eval_cfg: dict, **overrides: Any) -> EvalArgs:
        """From the ``eval`` config group (a plain dict); keys that are not fields (``enabled``) are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in eval_cfg.items() if k in known}
        values.update(overrides)
        values["temperatures"] = list(values.get("temperatures", cls.temperatures))
        values["best_of_n"] = list(values.get("best_of_n") or ())
        values["judge_args"] = dict(values.get("judge_args") or {})
        return cls(**values)


# -- judges ------------------------------------------------------------------------------------------
def build_judge(name: str, task: Any = None, key: str = "eval.judge", **judge_args: Any) -> Judge:
    """The judge ``name`` (:func:`alignexp.judges.build_judge`) with its arguments; errors name ``key``
    (``eval.judge``, ``agreement.judges``, ``export.judge``) and its ``..._args``."""
    from alignexp.judges import build_judge as build_named_judge

    if name == "gold" and (task is None or not getattr(task, "has_gold_reward", False)):
        raise ValueError(f"{key}=gold: task {getattr(task, 'name', None)!r} has no gold reward; "
                         f"use {key}=reward_model or {key}=llm (with {key.rsplit('.', 1)[0]}.judge_args)")
    try:
        return build_named_judge(name, task, **judge_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}={name}: {error}") from None


def resolve_judge(args: EvalArgs, task: Any) -> Judge | None:
    """``eval.judge``: ``auto`` is the gold reward where the task has one and no judge elsewhere (the
    text metrics still run; name ``reward_model`` or ``llm`` for win rates); ``none`` is no judge."""
    name = args.judge
    if name == "auto":
        name = "gold" if getattr(task, "has_gold_reward", False) else "none"
    return None if name == "none" else build_judge(name, task, **args.judge_args)


def _scores_cheaply(judge: Judge) -> bool:
    """Whether per-response scores are worth computing for every sample (not for an LLM judge's API calls)."""
    return hasattr(judge, "score") and getattr(judge, "name", "") != "llm"


# -- sampling and log-probs --------------------------------------------------------------------------
def sample(model, tokenizer, prompts: Sequence[Text], n: int, params: SamplingParams, args: EvalArgs,
           desc: str) -> list[list[Generation]]:
    """n generations per prompt in chunks (a tqdm bar); prompt i keeps its own random streams."""
    chunk = max(1, args.batch_size // n)
    starts = range(0, len(prompts), chunk)
    if args.progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)
    out: list[list[Generation]] = []
    for start in starts:
        out.extend(sample_responses(model, tokenizer, prompts[start:start + chunk], n, params, seed=args.seed,
                                    max_prompt_len=args.max_prompt_len, batch_size=args.batch_size,
                                    first_index=start))
    return out


def encode_generations(tokenizer, prompts: Sequence[Text], generations: Sequence[Sequence[Generation]],
                       max_prompt_len: int) -> list[EncodedExample]:
    """Prompts with their generated token ids as responses (exactly the sampled tokens, EOS included)."""
    return [EncodedExample(encode_text(tokenizer, p, is_prompt=True)[-max_prompt_len:],
                           [list(g.token_ids) for g in row]) for p, row in zip(prompts, generations)]


def logps(model, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int) -> list[list[float]]:
    """Summed log-probs of every response of every example under ``model`` (via models/logprobs.py)."""
    return [row.tolist() for row in compute_ref_logps(model, encoded, pad_id, batch_size)]


def implicit_rewards(policy, reference, encoded: Sequence[EncodedExample], pad_id: int, beta: float,
                     batch_size: int) -> list[list[float]]:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO, Rafailov et al. 2023, eq. 5), per response."""
    pi = logps(policy, encoded, pad_id, batch_size)
    ref = logps(reference, encoded, pad_id, batch_size)
    return [[beta * (a - b) for a, b in zip(ra, rb)] for ra, rb in zip(pi, ref)]


# -- held-out rankings ---------------------------------------------------------------------------------
def heldout_rankings(task, reference, tokenizer, args: EvalArgs) -> list[RankedExample]:
    """The task's held-out rankings: the synthetic task's are sampled from the reference (temperature 1)
    on the eval prompts and labelled by its gold reward; other tasks read their held-out split."""
    if getattr(task, "has_gold_reward", False):
        params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)

        def sample_fn(prompts: list[Text], n: int) -> list[list[str]]:
            rows = sample(reference, tokenizer, prompts, n, params, args, "held-out rankings")
            return [[decode(tokenizer, g) for g in row] for row in rows]

        examples = task.preference_examples(args.preference_split or "eval", sample_fn=sample_fn)
    else:
        split = args.preference_split or getattr(task, "eval_split", None)
        examples = task.preference_examples(split)
    examples = [ex for ex in examples if ex.n >= 2]
    if args.max_preference_examples is not None:
        examples = examples[: args.max_preference_examples]
    return examples


def preference_metrics(policy, reference, tokenizer, task, judge: Judge | None, args: EvalArgs,
                       max_response_len: int) -> tuple[dict, dict, dict]:
    """``preference_accuracy`` (and the implicit-reward margin) of policy and reference, and the judge's
    accuracy on the same held-out rankings. Returns (policy metrics, reference metrics, comparisons)."""
    try:
        examples = heldout_rankings(task, reference, tokenizer, args)
    except (DataUnavailable, FileNotFoundError, KeyError, NotImplementedError) as error:
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
    policy_metrics = {**ranking_accuracy(rewards, labels), **summary("implicit_reward_margin", margins)}
    zeros = [[0.0] * len(row) for row in rewards]  # the reference's implicit reward is 0 for every response
    reference_metrics_ = {**ranking_accuracy(zeros, labels), **summary("implicit_reward_margin", [0.0] * len(margins))}
    comparisons: dict[str, Any] = {"preference_examples": len(examples)}
    if judge is not None and _scores_cheaply(judge):
        prompts = [ex.prompt for ex in examples for _ in ex.responses]
        responses = [r for ex in examples for r in ex.responses]
        flat = batched(judge.score, prompts, responses, batch_size=args.batch_size,
                       desc=f"scoring held-out rankings ({judge.name})", progress=args.progress)
        rows, k = [], 0
        for ex in examples:
            rows.append(flat[k:k + ex.n])
            k += ex.n
        comparisons.update(ranking_accuracy(rows, labels, prefix="judge_preference_accuracy"))
    return policy_metrics, reference_metrics_, comparisons


# -- the evaluation ------------------------------------------------------------------------------------
def _baseline(args: EvalArgs, task: Any) -> str:
    if args.baseline != "auto":
        return args.baseline
    return "reference" if getattr(task, "has_gold_reward", False) else "dataset"


def _use_reference_metrics(args: EvalArgs, task: Any) -> bool:
    if args.reference_metrics == "auto":
        return not getattr(task, "has_gold_reward", False)
    return bool(args.reference_metrics)


def _text_metrics(judge: Judge | None, task: Any, prompts: Sequence[Text], texts: Sequence[str],
                  generations: Sequence[Generation], references: Sequence[Text] | None,
                  baseline_texts: Sequence[Text] | None, args: EvalArgs, use_references: bool) -> dict[str, Any]:
    """Per-model metrics of one set of samples (no log-probs)."""
    out: dict[str, Any] = {}
    if getattr(task, "has_gold_reward", False):
        out.update(summary("gold_reward", [task.gold_reward(p, t) for p, t in zip(prompts, texts)]))
    if judge is not None and judge.name != "gold" and _scores_cheaply(judge):
        out.update(summary("judge_score", batched(judge.score, prompts, texts, batch_size=args.batch_size,
                                                  desc=f"scoring ({judge.name})", progress=args.progress)))
    out.update(length_stats(texts, [len(g.token_ids) for g in generations], [g.finished for g in generations]))
    if use_references and references is not None:
        out.update(reference_metrics(texts, references, bootstrap=args.bootstrap, seed=args.seed))
    if baseline_texts is not None and judge is not None:
        out.update(win_rate(judge, prompts, texts, baseline_texts, prefix="win_rate_vs_dataset",
                            batch_size=args.batch_size, progress=args.progress))
    return out


def _best_of_n(reference: Any, tokenizer: Any, prompts: Sequence[Text], judge: Judge, task: Any,
               args: EvalArgs) -> list[dict[str, float]]:
    """Best-of-N from the reference at temperature 1, selected by the judge's score, for each N."""
    n_max = max(args.best_of_n)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    rows = sample(reference, tokenizer, prompts, n_max, params, args, f"best-of-{n_max} samples")
    texts = [[decode(tokenizer, g) for g in row] for row in rows]
    flat_prompts = [p for p in prompts for _ in range(n_max)]
    flat = batched(judge.score, flat_prompts, [t for row in texts for t in row], batch_size=args.batch_size,
                   desc=f"best-of-N scoring ({judge.name})", progress=args.progress)
    scores = [flat[i * n_max:(i + 1) * n_max] for i in range(len(prompts))]
    out = []
    for n in sorted(set(args.best_of_n)):
        chosen = best_of_n_indices(scores, n)
        picks = [row[i] for row, i in zip(texts, chosen)]
        entry: dict[str, float] = {"n": n, "kl": best_of_n_kl(n)}
        if getattr(task, "has_gold_reward", False):
            entry.update(summary("gold_reward", [task.gold_reward(p, t) for p, t in zip(prompts, picks)]))
        if judge.name != "gold":
            entry.update(summary("judge_score", [row[i] for row, i in zip(scores, chosen)]))
        out.append(entry)
    return out


def evaluate_policy(policy, reference, tokenizer, task, args: EvalArgs, judge: Judge | None = None,
                    max_response_len: int | None = None) -> dict:
    """Sample policy and reference on the held-out prompts and measure them (see the module docstring)."""
    start_time = time.time()
    examples = task.eval_examples()
    if not examples:
        raise ValueError(f"task {task.name}: no evaluation examples")
    prompts = [ex.prompt for ex in examples]
    references = [ex.target if ex.target is not None else ex.responses[0] for ex in examples] \
        if all(ex.responses or ex.target is not None for ex in examples) else None
    judge = judge if judge is not None else resolve_judge(args, task)
    baseline = _baseline(args, task)
    if baseline == "dataset" and references is None:
        raise ValueError(f"eval.baseline=dataset: task {task.name} has no reference responses")
    use_references = _use_reference_metrics(args, task)
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
        comparisons.update({"judge": judge.name if judge is not None else None, "baseline": "dataset" if baseline == "dataset" else
                            "reference_samples"})
        result["comparisons"] = comparisons
        result["examples"] = [{"prompt": p, "policy": a, "reference": b}
                              for p, a, b in list(zip(prompts, texts["policy"], texts["reference"]))[:args.n_examples]]
        by_temperature[f"{float(temperature):g}"] = result
        timings[f"T={float(temperature):g}"] = time.time() - t0

    best_of_n: list[dict] = []
    if args.best_of_n and hasattr(judge, "score"):
        t0 = time.time()
        best_of_n = _best_of_n(reference, tokenizer, prompts, judge, task, args)
        timings["best_of_n"] = time.time() - t0

    key = "1" if "1" in by_temperature else next(iter(by_temperature))
    headline = by_temperature[key]
    result = {"n_prompts": len(prompts), "temperature": float(key),
              "policy": {**headline["policy"], **pref_policy},
              "reference": {**headline["reference"], **pref_reference},
              "comparisons": {**headline["comparisons"], **pref_comparisons},
              "by_temperature": by_temperature}
    if best_of_n:
        result["best_of_n"] = best_of_n
    timings["total"] = time.time() - start_time
    result["eval_seconds"] = timings
    log.info("evaluation: %.1fs (%s)", timings["total"], ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return result


def write_eval_json(path: str | Path, *, task: str, loss: str, model: str, result: dict, **extra) -> dict:
    """Write ``eval.json`` in the contract's schema (task, loss, model, n_prompts, policy, reference,
    comparisons; other fields added freely)."""
    record = {"task": task, "loss": loss, "model": model, **result, **extra}
    Path(path).write_text(json.dumps(record, indent=2, default=str))
    return record


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics or not isinstance(metrics[key], (int, float)):
        return "-"
    stderr = metrics.get(key + "_stderr")
    return f"{metrics[key]:.3f} ± {stderr:.3f}" if isinstance(stderr, (int, float)) else f"{metrics[key]:.3f}"


TABLE_ROWS = (("gold reward", "gold_reward"), ("judge score", "judge_score"), ("KL to reference", "kl"),
              ("preference accuracy", "preference_accuracy"), ("BLEU", "bleu"), ("chrF", "chrf"), ("TER", "ter"),
              ("ROUGE-L", "rouge_l"), ("win rate vs dataset", "win_rate_vs_dataset"),
              ("response tokens", "response_tokens"))


def format_table(result: dict) -> str:
    """A reference-vs-policy table of the headline metrics present, then the win rate per temperature."""
    lines = [f"{'':<26}{'reference':>20}{'policy':>20}"]
    for label, key in TABLE_ROWS:
        if key in result["reference"] or key in result["policy"]:
            lines.append(f"{label:<26}{_cell(result['reference'], key):>20}{_cell(result['policy'], key):>20}")
    comparisons = result["comparisons"]
    lines.append(f"{'win rate vs reference':<26}{'':>20}{_cell(comparisons, 'win_rate_vs_reference'):>20}"
                 f"  (judge: {comparisons.get('judge', '')}, baseline: {comparisons.get('baseline', '-')}, "
                 f"T={result.get('temperature')})")
    by_temperature = result.get("by_temperature", {})
    if len(by_temperature) > 1:
        for t, entry in by_temperature.items():
            row = f"  T={t:<5}"
            for label, key, source in (("win", "win_rate_vs_reference", entry["comparisons"]),
                                       ("gold", "gold_reward", entry["policy"]), ("kl", "kl", entry["policy"])):
                if key in source:
                    row += f"  {label} {_cell(source, key)}"
            lines.append(row)
    for entry in result.get("best_of_n", []):
        lines.append(f"  best-of-{entry['n']:<4} KL {entry['kl']:.3f}  gold {_cell(entry, 'gold_reward')}")
    return "\n".join(lines)


# -- metric-human agreement ----------------------------------------------------------------------------
PairScorer = Callable[[Sequence[LabelledPair]], list[float | None]]
"""Verdicts (1, 0.5, 0; None where the scorer cannot judge the pair) on labelled pairs."""


def _score_verdicts(score_fn: Callable[[list[Text], list[Text]], list[float]], pairs: Sequence[LabelledPair],
                    batch_size: int, desc: str, progress: bool) -> list[float]:
    prompts = [p.prompt for p in pairs]
    better = batched(score_fn, prompts, [p.better for p in pairs], batch_size=batch_size, desc=desc,
                     progress=progress)
    worse = batched(score_fn, prompts, [p.worse for p in pairs], batch_size=batch_size, desc=desc,
                    progress=progress)
    return verdicts(better, worse)


def _is_one_of_pair(pair: LabelledPair) -> bool:
    """Whether the reference is one of the two responses (HH's eval "reference" is its chosen response;
    TL;DR compares the human reference itself): such a pair would leak its label, so it is left out."""
    reference = plain_text(pair.reference).strip()
    return reference in (plain_text(pair.better).strip(), plain_text(pair.worse).strip())


def _reference_verdicts(metric: Callable[[list[Text], list[Text]], list[float]],
                        pairs: Sequence[LabelledPair]) -> list[float | None]:
    rows = [i for i, p in enumerate(pairs) if p.reference is not None and not _is_one_of_pair(p)]
    out: list[float | None] = [None] * len(pairs)
    if rows:
        references = [pairs[i].reference for i in rows]
        better = metric([pairs[i].better for i in rows], references)
        worse = metric([pairs[i].worse for i in rows], references)
        for i, v in zip(rows, verdicts(better, worse)):
            out[i] = v
    return out


def agreement_scorers(judges: Sequence[Judge], batch_size: int = 64, progress: bool = False,
                      implicit_reward: PairScorer | None = None) -> dict[str, PairScorer]:
    """The automatic metrics whose agreement with human labels is measured, by name.

    ``rouge_l``/``rouge_1``/``bleu``: against the pair's reference (pairs without one, or whose
    reference is one of the two responses, are left out);
    ``length``: the longer response (in characters) wins; each judge: by its scores, or, for the
    ``llm`` judge, by ``compare`` in both orders; ``implicit_reward``: a policy's DPO reward.
    """
    scorers: dict[str, PairScorer] = {
        "rouge_l": lambda pairs: _reference_verdicts(lambda h, r: sentence_rouge(h, r)["rouge_l"], pairs),
        "rouge_1": lambda pairs: _reference_verdicts(lambda h, r: sentence_rouge(h, r)["rouge_1"], pairs),
        "bleu": lambda pairs: _reference_verdicts(sentence_bleu, pairs),
        "length": lambda pairs: verdicts([len(plain_text(p.better)) for p in pairs],
                                         [len(plain_text(p.worse)) for p in pairs]),
    }
    for judge in judges:
        if _scores_cheaply(judge):
            scorers[judge.name] = lambda pairs, j=judge: _score_verdicts(
                j.score, pairs, batch_size, f"scoring ({j.name})", progress)
        else:
            def by_comparison(pairs, j=judge):
                forward, swapped = both_orders_verdicts(j, [p.prompt for p in pairs], [p.better for p in pairs],
                                                        [p.worse for p in pairs], batch_size, progress)
                return [(f + 1.0 - s) / 2.0 for f, s in zip(forward, swapped)]
            scorers[judge.name] = by_comparison
    if implicit_reward is not None:
        scorers["implicit_reward"] = implicit_reward
    return scorers


def agreement_report(pairs: Sequence[LabelledPair], scorers: dict[str, PairScorer]) -> dict[str, dict]:
    """For each metric: the fraction of labelled pairs on which it prefers the human's choice (ties half),
    with a 95% Wilson interval, over the pairs it can judge (``n``)."""
    out = {}
    for name, scorer in scorers.items():
        verdicts = [v for v in scorer(pairs) if v is not None]
        if verdicts:
            out[name] = agreement(verdicts)
        else:
            out[name] = {"agreement": None, "n": 0, "skipped": "no pair with what this metric needs (a reference)"}
    return out


def format_agreement(report: dict[str, dict]) -> str:
    lines = [f"{'metric':<20}{'agreement':>10}{'95% CI':>18}{'ties':>6}{'n':>7}"]
    for name, row in report.items():
        if row.get("agreement") is None:
            lines.append(f"{name:<20}{'-':>10}{'':>18}{'':>6}{0:>7}  ({row.get('skipped', '')})")
            continue
        ci = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        lines.append(f"{name:<20}{row['agreement']:>10.3f}{ci:>18}{row['ties']:>6}{row['n']:>7}")
    return "\n".join(lines)


def reference_texts(task, sources: Sequence[str]) -> dict[str, Text]:
    """Prompt -> reference response, from the task's ``eval`` examples and/or ``sft`` demonstrations."""
    out: dict[str, Text] = {}
    for source in sources:
        try:
            examples = task.eval_examples() if source == "eval" else task.sft_examples()
        except (DataUnavailable, FileNotFoundError, KeyError, NotImplementedError) as error:  # optional
            log.warning("references from the task's %s data: unavailable (%s)", source, error)
            continue
        for ex in examples:
            out.setdefault(prompt_key(ex.prompt), ex.target if ex.target is not None else ex.responses[0])
    return out


# -- the command line ----------------------------------------------------------------------------------
def _run_folder_info(policy: Path) -> tuple[dict, dict]:
    """The training run's resolved config and eval.json next to a ``<run>/policy`` folder (empty if absent)."""
    from omegaconf import OmegaConf

    run = policy.parent
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) if (run / "config.yaml").exists() else {}
    record = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    return config, record


def _load(path: str, cfg: DictConfig, tokenizer: Any, device_type: str) -> Any:
    from omegaconf import OmegaConf

    from alignexp.models.backbone import ModelArgs, build_model

    args = ModelArgs(**{**OmegaConf.to_container(cfg.model, resolve=True), "path": str(path)})
    return build_model(args, tokenizer, device_type).requires_grad_(False).eval()


def run(cfg) -> dict:
    """``python -m alignexp.evaluate``: the mode's work for a composed config; returns what it wrote."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from alignexp.config import setup_runtime
    from alignexp.hardware import HardwareArgs
    from alignexp.models.backbone import ModelArgs, build_tokenizer

    hw = HardwareArgs(**cfg.hardware)
    setup_runtime(cfg.seed, hw.threads)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    task = instantiate(cfg.task)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    policy_path = Path(cfg.policy).expanduser() if cfg.policy else None
    run_config, run_record = _run_folder_info(policy_path) if policy_path else ({}, {})
    beta = cfg.beta if cfg.beta is not None else (run_config.get("loss") or {}).get("beta", 1.0)
    reference_path = cfg.reference or run_record.get("init_from")
    args = EvalArgs.from_config(eval_cfg, max_prompt_len=cfg.model.max_prompt_len, beta=float(beta))
    model_args = ModelArgs(**{**OmegaConf.to_container(cfg.model, resolve=True),
                              "path": str(policy_path or reference_path) if (policy_path or reference_path)
                              else cfg.model.path})
    tokenizer = build_tokenizer(model_args)
    policy = _load(str(policy_path), cfg, tokenizer, hw.device_type) if policy_path else None
    reference = _load(str(reference_path), cfg, tokenizer, hw.device_type) if reference_path else None

    if cfg.mode == "policy":
        if policy is None or reference is None:
            raise ValueError("mode=policy needs policy=<HF folder> and reference=<HF folder> (the reference "
                             "can be left out for a training run's <run>/policy, whose eval.json names it)")
        result = evaluate_policy(policy, reference, tokenizer, task, args,
                                 max_response_len=cfg.model.max_response_len)
        record = write_eval_json(out / "eval.json", task=task.name,
                                 loss=(run_config.get("loss") or {}).get("name", run_record.get("loss", "unknown")),
                                 model=cfg.model.name, result=result, policy_path=str(policy_path),
                                 init_from=str(reference_path), hparams={"beta": args.beta})
        print(format_table(result), flush=True)
        print(f"[alignexp] eval.json: {out / 'eval.json'}", flush=True)
        return record

    if cfg.mode == "agreement":
        agreement_cfg = cfg.agreement
        sampler_model = reference or policy
        if getattr(task, "has_gold_reward", False):
            if sampler_model is None:
                raise ValueError("mode=agreement on a task that samples its rankings needs reference=<HF folder>")
            examples = heldout_rankings(task, sampler_model, tokenizer, EvalArgs.from_config(
                eval_cfg, preference_split=agreement_cfg.split, max_preference_examples=agreement_cfg.max_examples,
                progress=args.progress))
        else:
            examples = task.preference_examples(agreement_cfg.split or getattr(task, "eval_split", None))
            examples = [ex for ex in examples if ex.n >= 2]
            if agreement_cfg.max_examples:
                examples = examples[: agreement_cfg.max_examples]
        references = reference_texts(task, list(agreement_cfg.references or []))
        pairs = pairs_from_rankings(examples, references)
        judges = [build_judge(name, task, key="agreement.judges",
                              **dict((agreement_cfg.judge_args or {}).get(name, {})))
                  for name in agreement_cfg.judges or []]
        implicit = None
        if policy is not None and reference is not None:
            def implicit(pairs_: Sequence[LabelledPair]) -> list[float | None]:
                encoded = [encode_example(tokenizer, RankedExample(p.prompt, [p.better, p.worse]),
                                          args.max_prompt_len, cfg.model.max_response_len) for p in pairs_]
                rewards = implicit_rewards(policy, reference, encoded, tokenizer.pad_token_id, args.beta,
                                           args.batch_size)
                return verdicts([r[0] for r in rewards], [r[1] for r in rewards])
        report = agreement_report(pairs, agreement_scorers(judges, args.batch_size, args.progress, implicit))
        record = {"task": task.name, "n_rankings": len(examples), "n_pairs": len(pairs),
                  "n_pairs_with_reference": sum(p.reference is not None for p in pairs), "agreement": report}
        (out / "agreement.json").write_text(json.dumps(record, indent=2))
        print(format_agreement(report), flush=True)
        print(f"[alignexp] agreement.json: {out / 'agreement.json'}", flush=True)
        return record

    if cfg.mode == "export":
        from alignexp import exports

        export_cfg = cfg.export
        if policy is None:
            raise ValueError("mode=export needs policy=<HF folder>")
        if not export_cfg.alpaca_eval and not export_cfg.mt_bench:
            raise ValueError("mode=export: set export.alpaca_eval=<eval set JSON> and/or "
                             "export.mt_bench=<question.jsonl>")
        model_id = export_cfg.model_id or (policy_path.parent.name if policy_path.name == "policy"
                                           else policy_path.name)
        generate_fn = exports.engine_generator(policy, tokenizer, export_cfg.max_new_tokens, args.max_prompt_len,
                                               export_cfg.batch_size)
        record: dict[str, Any] = {"model_id": model_id}
        if export_cfg.alpaca_eval:
            outputs = exports.alpaca_eval_outputs(exports.read_alpaca_eval(export_cfg.alpaca_eval), generate_fn,
                                                  model_id, export_cfg.temperature, cfg.seed,
                                                  progress=args.progress)
            record["alpaca_eval"] = str(exports.write_json(out / "alpaca_eval" / "model_outputs.json", outputs))
        if export_cfg.mt_bench:
            questions = exports.read_mt_bench(export_cfg.mt_bench)
            answers = exports.mt_bench_answers(questions, generate_fn, model_id, cfg.seed, progress=args.progress)
            record["mt_bench"] = str(exports.write_jsonl(out / "mt_bench" / "model_answer" / f"{model_id}.jsonl",
                                                         answers))
            if export_cfg.judge:
                judge = build_judge(export_cfg.judge, task, key="export.judge", **dict(export_cfg.judge_args or {}))
                complete = exports.chat_completion(judge)
                judgments, scores = exports.grade_mt_bench(questions, answers, complete,
                                                           getattr(judge, "model", export_cfg.judge),
                                                           progress=args.progress)
                exports.write_jsonl(out / "mt_bench" / "model_judgment" / "single.jsonl", judgments)
                record["mt_bench_scores"] = scores
        (out / "exports.json").write_text(json.dumps(record, indent=2))
        for key, value in record.items():
            print(f"[alignexp] {key}: {value}", flush=True)
        return record
    raise ValueError(f"mode must be policy, agreement or export, got {cfg.mode!r}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point (conf/evaluate.yaml): clear errors for bad settings, data and paths."""
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, DataUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as error:  # a model folder that cannot be loaded (backbone's message names it)
        if "model.path" not in str(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
