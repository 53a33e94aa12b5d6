"""The judge interface every judge follows (gold reward, reward model, LLM judge).

A judge takes text, never token ids (STYLE 10):

* ``score(prompts, responses) -> list[float]``: one score per (prompt, response), higher is better;
* ``compare(prompts, first, second) -> list[float]``: 1 where ``first`` wins, 0 where ``second`` wins,
  0.5 for a tie (or, for the LLM judge, an abstention);
* ``rank(prompt, responses) -> RankedExample``: the responses best first with their scores, so that
  judged candidates of any number feed every loss (AI feedback as rankings);
* ``rank_all(prompts, candidates) -> list[RankedExample]``: ``rank`` for many prompts at once (judges
  that batch, such as the reward model, score them together).

:class:`ScoreJudge` derives ``compare``, ``rank`` and ``rank_all`` from ``score``; a pairwise judge
(the LLM judge) derives ``rank`` from ``compare`` instead (:func:`rank_by_comparisons`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import Any, Protocol, runtime_checkable

from alignexp.tasks.base import RankedExample, Text, sort_by_scores


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]: ...

    def compare(self, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text]) -> list[float]: ...

    def rank(self, prompt: Text, responses: Sequence[Text], meta: dict[str, Any] | None = None) -> RankedExample: ...

    def rank_all(self, prompts: Sequence[Text], candidates: Sequence[Sequence[Text]],
                 metas: Sequence[dict[str, Any]] | None = None) -> list[RankedExample]: ...


def verdicts(first_scores: Sequence[float], second_scores: Sequence[float]) -> list[float]:
    """1 where the first score is higher, 0 where it is lower, 0.5 for equal (or NaN) scores."""
    out = []
    for a, b in zip(first_scores, second_scores):
        if math.isnan(a) or math.isnan(b) or a == b:
            out.append(0.5)
        else:
            out.append(1.0 if a > b else 0.0)
    return out


def ranked_example(prompt: Text, responses: Sequence[Text], scores: Sequence[float], judge: str,
                   meta: dict[str, Any] | None = None) -> RankedExample:
    """A RankedExample of ``responses`` sorted best first by ``scores`` (stable: ties keep their order).

    ``meta`` gains ``judge`` (the judge's name) and ``order`` (each ranked response's index in the input).
    """
    if len(scores) != len(responses):
        raise ValueError(f"{len(scores)} scores for {len(responses)} responses")
    if any(math.isnan(s) for s in scores):
        raise ValueError(f"judge '{judge}' gave a NaN score; it cannot rank these responses")
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    ranked, sorted_scores = sort_by_scores(list(responses), list(scores))
    return RankedExample(prompt=prompt, responses=ranked, scores=sorted_scores,
                         meta={**(meta or {}), "judge": judge, "order": order})


class ScoreJudge:
    """Base of judges with a pointwise score: ``compare`` and ``rank`` follow from ``score``."""

    name = "score"

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text]) -> list[float]:
        """1 where ``first`` wins, 0 where ``second`` wins, 0.5 for a tie."""
        return verdicts(self.score(prompts, first), self.score(prompts, second))

    def rank(self, prompt: Text, responses: Sequence[Text], meta: dict[str, Any] | None = None) -> RankedExample:
        """``responses`` best first by score, with their scores."""
        return self.rank_all([prompt], [responses], [meta or {}])[0]

    def rank_all(self, prompts: Sequence[Text], candidates: Sequence[Sequence[Text]],
                 metas: Sequence[dict[str, Any]] | None = None) -> list[RankedExample]:
        """:meth:`rank` for every prompt; all responses are scored in one :meth:`score` call."""
        flat_prompts = [p for p, rs in zip(prompts, candidates) for _ in rs]
        flat = self.score(flat_prompts, [r for rs in candidates for r in rs])
        out, start = [], 0
        for i, (prompt, responses) in enumerate(zip(prompts, candidates)):
            scores = flat[start:start + len(responses)]
            start += len(responses)
            out.append(ranked_example(prompt, responses, scores, self.name, metas[i] if metas else None))
        return out


def rank_by_comparisons(judge: Judge, prompt: Text, responses: Sequence[Text],
                        meta: dict[str, Any] | None = None) -> RankedExample:
    """Rank with a pairwise judge: every pair is compared once (n (n - 1) / 2 comparisons) and each
    response scores its wins (a tie or abstention gives both 0.5), i.e. its Copeland/Borda count."""
    pairs = list(combinations(range(len(responses)), 2))
    wins = [0.0] * len(responses)
    if pairs:
        results = judge.compare([prompt] * len(pairs), [responses[i] for i, _ in pairs],
                                [responses[j] for _, j in pairs])
        for (i, j), result in zip(pairs, results):
            wins[i] += result
            wins[j] += 1.0 - result
    return ranked_example(prompt, responses, wins, judge.name, meta)
