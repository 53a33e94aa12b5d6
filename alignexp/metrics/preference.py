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

The pairs of one ranking share a prompt and responses, so their verdicts are correlated: standard
errors and intervals are clustered by ranking (:func:`alignexp.metrics.stats.clustered_mean_stderr`);
taken over pairs as if independent they come out too small.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from alignexp.judges.base import verdicts
from alignexp.metrics.stats import clustered_interval, clustered_mean_stderr, mean_stderr, wilson_interval
from alignexp.tasks.base import RankedExample, Text


def labelled_pairs(n: int, label_scores: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, of a best-first ranking of n responses whose labels are not tied."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)
            if label_scores is None or label_scores[i] != label_scores[j]]


def ranking_verdicts(scores: Sequence[Sequence[float]],
                     label_scores: Sequence[Sequence[float] | None] | None = None) -> list[list[float]]:
    """The scorer's verdicts on each ranking's labelled pairs, one list per ranking:
    ``scores[k][i]`` scores response i of ranking k."""
    out: list[list[float]] = []
    for k, row in enumerate(scores):
        labels = None if label_scores is None else label_scores[k]
        pairs = labelled_pairs(len(row), labels)
        out.append(verdicts([row[i] for i, _ in pairs], [row[j] for _, j in pairs]))
    return out


def ranking_accuracy(scores: Sequence[Sequence[float]], label_scores: Sequence[Sequence[float] | None] | None = None,
                     prefix: str = "preference_accuracy") -> dict[str, float]:
    """Fraction of labelled pairs the scorer orders as the labels do (ties half), with its standard error
    and 95% interval clustered by ranking (each row of ``scores`` is one ranking).

    Keys: ``prefix`` (the accuracy over all pairs), ``prefix_stderr`` (cluster-robust),
    ``prefix_ci_low``/``prefix_ci_high``, ``prefix_n_pairs``, ``prefix_n_rankings`` (rankings with a pair).
    Example: scores [[3, 1, 2]] for a ranking of 3: pairs (0,1) agree, (0,2) agree, (1,2) disagree,
    so accuracy = 2/3.
    """
    per_ranking = ranking_verdicts(scores, label_scores)
    values = [v for row in per_ranking for v in row]
    clusters = [k for k, row in enumerate(per_ranking) for _ in row]
    mean, stderr, low, high, g = clustered_interval(values, clusters)
    return {prefix: mean, f"{prefix}_stderr": stderr, f"{prefix}_ci_low": low, f"{prefix}_ci_high": high,
            f"{prefix}_n_pairs": len(values), f"{prefix}_n_rankings": g}


def agreement(verdicts: Sequence[float], clusters: Sequence[object] | None = None) -> dict[str, float]:
    """``agreement`` (mean verdict), its ``stderr``, a 95% Wilson interval ``ci_low``/``ci_high``, ``ties``
    and ``n``.

    Without ``clusters`` the pairs count as independent: the Wilson interval of the proportion over n.
    With ``clusters`` (one label per verdict: the ranking each pair came from, ``LabelledPair.ranking``)
    the stderr is cluster-robust and the Wilson interval is taken at the effective sample size
    n_eff = p (1 - p) / SE^2 (at most n), the design-effect correction of Korn & Graubard (1998,
    "Confidence intervals for proportions with small expected number of positive counts estimated
    from survey data"); ``n_clusters`` is added.

    Example: verdicts [1, 1, 1, 0.5, 0] give agreement 3.5/5 = 0.7 and one tie. Verdicts
    (1, 1, 0 | 1 | 0, 0) from three rankings: p = 0.5, clustered SE = 0.25, n_eff = 0.25 / 0.0625 = 4,
    Wilson at 2 of 4: [0.150039, 0.849961].
    """
    n = len(verdicts)
    successes = float(sum(verdicts))
    p = successes / n if n else float("nan")
    if clusters is None:
        low, high = wilson_interval(successes, n)
        stderr = mean_stderr(verdicts)[1]
        return {"agreement": p, "stderr": stderr, "ci_low": low, "ci_high": high,
                "ties": sum(1 for v in verdicts if v == 0.5), "n": n}
    _, stderr, g = clustered_mean_stderr(verdicts, clusters)
    n_eff = min(float(n), p * (1 - p) / stderr ** 2) if stderr > 0 and 0 < p < 1 else float(n)
    low, high = wilson_interval(p * n_eff, n_eff) if n else (float("nan"), float("nan"))
    return {"agreement": p, "stderr": stderr, "ci_low": low, "ci_high": high,
            "ties": sum(1 for v in verdicts if v == 0.5), "n": n, "n_clusters": g}


@dataclass
class LabelledPair:
    """One human preference: ``better`` over ``worse`` for ``prompt``; ``reference``: a gold text if known;
    ``ranking``: the index of the ranking it came from (the cluster its standard errors are taken over)."""

    prompt: Text
    better: Text
    worse: Text
    reference: Text | None = None
    ranking: int | None = None


def prompt_key(prompt: Text) -> str:
    """A prompt as a dictionary key: the string itself, or a chat's messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def pairs_from_rankings(examples: Sequence[RankedExample],
                        references: dict[str, Text] | None = None) -> list[LabelledPair]:
    """Every labelled pair of every ranking, with its reference (the example's ``target``, else
    ``references[prompt_key(prompt)]`` where given) and its ranking's index in ``examples``."""
    pairs = []
    for index, example in enumerate(examples):
        reference = example.target
        if reference is None and references:
            reference = references.get(prompt_key(example.prompt))
        for i, j in labelled_pairs(example.n, example.scores):
            pairs.append(LabelledPair(example.prompt, example.responses[i], example.responses[j], reference, index))
    return pairs
