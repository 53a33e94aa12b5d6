"""Agreement with preference labels: preference accuracy of a scorer, and metric-human agreement.

A labelled ranking lists its responses best first (RankedExample). A scorer s (a policy's implicit
reward, a reward model, ROUGE against a reference, length, ...) **agrees** on a pair (i, j), i ranked
above j, when s_i > s_j; a tie s_i = s_j counts half. Pairs the labels themselves tie (equal
``scores``) carry no preference and are left out.

* :func:`ranking_accuracy`: over every ordered pair of every ranking, the fraction the scorer orders
  as the labels do. For a DPO policy the scorer is the implicit reward
  r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5), and its accuracy
  is the held-out "reward accuracy"; beta > 0 does not change the order.
Verdicts are :func:`alignexp.judges.base.verdicts` (1, 0.5 on a tie or a NaN score, 0).

* :func:`agreement`: a metric's per-pair verdicts (1, 0.5, 0) summarised as the fraction that agree
  with the human label, with a 95% Wilson interval (ties as half a success).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from alignexp.judges.base import verdicts
from alignexp.metrics.stats import summary, wilson_interval
from alignexp.tasks.base import RankedExample, Text


def labelled_pairs(n: int, label_scores: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of a best-first ranking of n responses whose labels are not tied."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)
            if label_scores is None or label_scores[i] != label_scores[j]]


def ranking_verdicts(scores: Sequence[Sequence[float]],
                     label_scores: Sequence[Sequence[float] | None] | None = None) -> list[float]:
    """The scorer's verdict on every labelled pair: ``scores[k][i]`` scores response i of ranking k."""
    out: list[float] = []
    for k, row in enumerate(scores):
        labels = None if label_scores is None else label_scores[k]
        pairs = labelled_pairs(len(row), labels)
        out.extend(verdicts([row[i] for i, _ in pairs], [row[j] for _, j in pairs]))
    return out


def ranking_accuracy(scores: Sequence[Sequence[float]], label_scores: Sequence[Sequence[float] | None] | None = None,
                     prefix: str = "preference_accuracy") -> dict[str, float]:
    """Fraction of labelled pairs the scorer orders as the labels do (ties half), ± stderr over pairs.

    Example: scores [[3, 1, 2]] for a ranking of 3: pairs (0,1) agree, (0,2) agree, (1,2) disagree,
    so accuracy = 2/3.
    """
    verdicts = ranking_verdicts(scores, label_scores)
    return {**summary(prefix, verdicts), f"{prefix}_n_pairs": len(verdicts)}


def agreement(verdicts: Sequence[float]) -> dict[str, float]:
    """``agreement`` (mean verdict), its 95% Wilson interval ``ci_low``/``ci_high``, ``ties`` and ``n``.

    Example: verdicts [1, 1, 1, 0.5, 0] give agreement 3.5/5 = 0.7 and one tie.
    """
    n = len(verdicts)
    successes = float(sum(verdicts))
    low, high = wilson_interval(successes, n)
    return {"agreement": successes / n if n else float("nan"), "ci_low": low, "ci_high": high,
            "ties": sum(1 for v in verdicts if v == 0.5), "n": n}


@dataclass
class LabelledPair:
    """One human preference: ``better`` over ``worse`` for ``prompt``; ``reference``: a gold text if known."""

    prompt: Text
    better: Text
    worse: Text
    reference: Text | None = None


def prompt_key(prompt: Text) -> str:
    """A prompt as a dictionary key: the string itself, or a chat's messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def pairs_from_rankings(examples: Sequence[RankedExample],
                        references: dict[str, Text] | None = None) -> list[LabelledPair]:
    """Every labelled pair of every ranking, with its reference: the example's ``target``, else
    ``references[prompt_key(prompt)]`` where given."""
    pairs = []
    for example in examples:
        reference = example.target
        if reference is None and references:
            reference = references.get(prompt_key(example.prompt))
        for i, j in labelled_pairs(example.n, example.scores):
            pairs.append(LabelledPair(example.prompt, example.responses[i], example.responses[j], reference))
    return pairs
