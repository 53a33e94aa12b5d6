"""Metric-human agreement: how often each automatic metric prefers the human's choice on labelled pairs.

Metrics: ROUGE and BLEU against the pair's reference, length, the run's judge and, given a policy and
its reference, the implicit reward (docs/evaluation.md). ``python -m alignexp.evaluate mode=agreement``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from alignexp.args import EvalArgs, check_choice, check_number
from alignexp.errors import ConfigError
from alignexp.evaluation.policy import UNAVAILABLE, heldout_rankings, implicit_rewards, scores_cheaply
from alignexp.judges.base import verdicts
from alignexp.metrics.overlap import plain_text, sentence_bleu, sentence_rouge
from alignexp.metrics.preference import LabelledPair, agreement, prompt_key
from alignexp.metrics.winrate import Judge, batched, both_orders_verdicts
from alignexp.models.logprobs import encode_example
from alignexp.tasks.base import RankedExample, Task, Text

log = logging.getLogger("alignexp.evaluation")

PairScorer = Callable[[Sequence[LabelledPair]], list[float | None]]
"""Verdicts (1, 0.5, 0; None where the scorer cannot judge the pair) on labelled pairs."""


@dataclass
class AgreementArgs:
    """``agreement`` (conf/evaluate.yaml): the held-out ``split`` (null: the task's eval split; tasks that
    sample their rankings sample them from the reference), at most ``max_examples`` rankings, and where
    reference responses come from (``references``: ``eval`` and/or ``sft`` examples, matched by prompt)."""

    split: str | None = None
    max_examples: int | None = None
    references: list[str] = field(default_factory=lambda: ["eval"])

    def __post_init__(self) -> None:
        check_number("agreement.max_examples", self.max_examples, low=1, integer=True, optional=True)
        self.references = list(self.references or [])
        for source in self.references:
            check_choice("agreement.references", source, ("eval", "sft"))


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
        if scores_cheaply(judge):
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


def implicit_reward_scorer(policy, reference, tokenizer, args: EvalArgs, max_response_len: int) -> PairScorer:
    """Verdicts of the implicit reward beta * log(pi/pi_ref) (DPO, Rafailov et al. 2023, eq. 5) on pairs."""

    def scorer(pairs: Sequence[LabelledPair]) -> list[float | None]:
        encoded = [encode_example(tokenizer, RankedExample(p.prompt, [p.better, p.worse]), args.max_prompt_len,
                                  max_response_len) for p in pairs]
        rewards = implicit_rewards(policy, reference, encoded, tokenizer.pad_token_id, args.beta, args.batch_size)
        return verdicts([r[0] for r in rewards], [r[1] for r in rewards])

    return scorer


def agreement_report(pairs: Sequence[LabelledPair], scorers: dict[str, PairScorer]) -> dict[str, dict]:
    """For each metric: the fraction of labelled pairs on which it prefers the human's choice (ties half),
    with a 95% Wilson interval, over the pairs it can judge (``n``); its standard error is clustered by the
    ranking each pair came from (the pairs of one ranking are not independent)."""
    out = {}
    for name, scorer in scorers.items():
        judged = [(v, p.ranking) for v, p in zip(scorer(pairs), pairs) if v is not None]
        if judged:
            out[name] = agreement([v for v, _ in judged], clusters=[c for _, c in judged])
        else:
            out[name] = {"agreement": None, "n": 0, "skipped": "no pair with what this metric needs (a reference)"}
    return out


def agreement_rankings(task: Task, sampler_model, tokenizer, args: EvalArgs,
                       agreement_args: AgreementArgs) -> list[RankedExample]:
    """The labelled rankings to measure on: the task's held-out ones (sampled from ``sampler_model``, a
    reference, where the task samples its preferences)."""
    if task.samples_preferences and sampler_model is None:
        raise ConfigError(f"reference: mode=agreement on task {task.name}, which samples its rankings, needs "
                          f"reference=<HF folder> (or policy=<run>/policy, whose eval.json names it)")
    return heldout_rankings(task, sampler_model, tokenizer, dataclasses.replace(
        args, preference_split=agreement_args.split, max_preference_examples=agreement_args.max_examples))


def reference_texts(task: Task, sources: Sequence[str]) -> dict[str, Text]:
    """Prompt -> reference response, from the task's ``eval`` examples and/or ``sft`` demonstrations."""
    out: dict[str, Text] = {}
    for source in sources:
        try:
            examples = task.eval_examples() if source == "eval" else task.sft_examples()
        except UNAVAILABLE as error:  # optional
            log.warning("references from the task's %s data: unavailable (%s)", source, error)
            continue
        for ex in examples:
            out.setdefault(prompt_key(ex.prompt), ex.target if ex.target is not None else ex.responses[0])
    return out
