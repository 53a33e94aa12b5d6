"""Pair builders: turn a ranked list of responses into (chosen, rejected) pairs for pairwise losses.

Strategies (the ``pairs`` setting):

- ``best_worst``: the best against the worst response.
- ``adjacent``: each response against the next one in the ranking.
- ``all``: every pair of the ranking (n (n - 1) / 2 at most).
- ``first_round``: RSO's first-round ranking (Liu et al. 2023, "Statistical Rejection Sampling
  Improves Preference Optimization", Sec. 5.2 and Appendix): candidates are paired in the order
  they were sampled, (y1, y2), (y3, y4), ..., and each pair is labelled by its scores.
- ``tournament``: RSO's tournament ranking: the first round as above, then the winners of each
  round are paired again, knockout style, until one remains (n - 1 pairs for n a power of two).
  With an odd number of players in a round, the last one advances without a match (a bye).

The two RSO strategies depend on the order of the candidates. A :class:`RankedExample` holds its
responses sorted best first, so the order they were sampled in is lost: pass ``rng`` to shuffle
them first (which is what RSO's i.i.d. samples amount to); with ``rng=None`` the ranked order is
used as given, which is deterministic but always pairs neighbours in the ranking.

Each pair is a RankedExample with n = 2, best first, its scores carried (or None), the target and
a copy of ``meta`` plus ``meta["pair"] = (i, j)``, the indices of the two responses in the input.
Tied responses (equal scores) make no pair; without scores the ranking positions are the labels,
so there are no ties. This is the tie treatment every listwise loss and the reward model share
(:func:`alignexp.losses.common.ordered_pairs`): ``all`` yields exactly the ordered pairs they compare.

:func:`check_scores` refuses a dataset that mixes scored and unscored rankings for a loss that reads
scores.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from alignexp.losses.registry import LossSpec
from alignexp.tasks.base import RankedExample

PAIR_STRATEGIES = ("best_worst", "adjacent", "all", "first_round", "tournament")


def check_strategy(strategy: str) -> None:
    """Raise ValueError naming ``pairs`` when ``strategy`` is not one of :data:`PAIR_STRATEGIES`."""
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"pairs must be one of {', '.join(PAIR_STRATEGIES)}; got {strategy!r}")


def _as_rng(rng: Any) -> Any:
    """None stays None; an int seeds a ``random.Random``; anything with ``shuffle`` is used as is
    (``random.Random``, ``numpy.random.Generator``)."""
    if rng is None or hasattr(rng, "shuffle"):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"rng must be None, an int seed or have a shuffle method, got {type(rng).__name__}")


def _labels(example: RankedExample) -> list[float]:
    """The scores, or the ranking positions (n - 1 - k) when the example has none."""
    if example.scores is not None:
        return [float(s) for s in example.scores]
    return [float(example.n - 1 - k) for k in range(example.n)]


def _pair(example: RankedExample, labels: Sequence[float], i: int, j: int) -> RankedExample | None:
    """The pair of responses i and j, better first; None when their labels tie."""
    if labels[i] == labels[j]:
        return None
    if labels[i] < labels[j]:
        i, j = j, i
    return RankedExample(
        prompt=example.prompt,
        responses=[example.responses[i], example.responses[j]],
        scores=None if example.scores is None else [example.scores[i], example.scores[j]],
        target=example.target,
        meta={**example.meta, "pair": (i, j)},
    )


def _ranked_order(labels: Sequence[float]) -> list[int]:
    """Indices best first (stable, so ties keep their given order)."""
    return sorted(range(len(labels)), key=lambda i: -labels[i])


def _index_pairs(labels: Sequence[float], strategy: str, rng: Any) -> list[tuple[int, int]]:
    n = len(labels)
    if n < 2:
        return []
    if strategy == "best_worst":
        order = _ranked_order(labels)
        return [(order[0], order[-1])]
    if strategy == "adjacent":
        order = _ranked_order(labels)
        return list(zip(order, order[1:]))
    if strategy == "all":
        order = _ranked_order(labels)
        return [(order[a], order[b]) for a in range(n) for b in range(a + 1, n)]
    players = list(range(n))
    if rng is not None:
        rng.shuffle(players)
    if strategy == "first_round":
        return list(zip(players[0::2], players[1::2]))
    matches: list[tuple[int, int]] = []  # tournament
    while len(players) > 1:
        winners = []
        for a, b in zip(players[0::2], players[1::2]):
            matches.append((a, b))
            winners.append(a if labels[a] >= labels[b] else b)  # a tie sends the first player on
        if len(players) % 2:
            winners.append(players[-1])
        players = winners
    return matches


def make_pairs(example: RankedExample, strategy: str, rng: Any = None) -> list[RankedExample]:
    """The (chosen, rejected) pairs of ``example`` under ``strategy`` (see the module docstring).

    Args:
        example: a ranked example with n >= 1 responses (n < 2 gives no pair).
        strategy: one of :data:`PAIR_STRATEGIES`.
        rng: for ``first_round`` and ``tournament`` only: None (use the order given), an int seed,
            or a ``random.Random`` / ``numpy.random.Generator`` that shuffles the candidates first.
    Returns:
        n = 2 examples, best first, in a deterministic order for a given rng state.
    """
    check_strategy(strategy)
    labels = _labels(example)
    pairs = (_pair(example, labels, i, j) for i, j in _index_pairs(labels, strategy, _as_rng(rng)))
    return [p for p in pairs if p is not None]


def pairs_for_loss(examples: Iterable[RankedExample], spec: LossSpec, strategy: str,
                   rng: Any = None) -> list[RankedExample]:
    """What a loss trains on: listwise losses (and single-response ones such as ``sft``, which read
    column 0 only) get ``examples`` untouched; pairwise losses get the pairs of every example under
    ``strategy``. The strategy is checked in every case, so a bad ``pairs`` value fails early.
    An int ``rng`` seeds one generator for the whole pass."""
    check_strategy(strategy)
    if spec.listwise or spec.min_responses < 2:
        return examples if isinstance(examples, list) else list(examples)
    rng = _as_rng(rng)
    return [pair for example in examples for pair in make_pairs(example, strategy, rng)]


def check_scores(examples: Sequence[RankedExample], spec: LossSpec) -> None:
    """Raise ValueError when ``examples`` mix rankings with ``scores`` and rankings without, for a loss
    that reads scores (``spec.uses_scores``: RRHF, PRO, LiPO as labels; ranked DPO and the reward model
    for their ties). The collator passes a batch's scores only when every ranking in it has them, so a
    mixed dataset would silently switch such a loss to its unscored definition batch by batch. The
    error names the first record whose kind differs from the first record's (its position, and its
    ``meta`` source and index where present). Losses that ignore scores accept any mix.
    """
    if not spec.uses_scores or not examples:
        return
    first_scored = examples[0].scores is not None
    for position, example in enumerate(examples):
        if (example.scores is not None) != first_scored:
            has, lacks = (0, position) if first_scored else (position, 0)
            raise ValueError(
                f"training rankings mix scored and unscored records: {_record(examples, lacks)} has no "
                f"scores while {_record(examples, has)} has; loss '{spec.name}' reads the scores of a whole "
                "batch (as labels, temperatures or to find ties) and would silently use its unscored "
                "definition for batches that hold both. Give every ranking scores, or none")


def _record(examples: Sequence[RankedExample], position: int) -> str:
    """``record 5 (source 'hh', index 17)``: a ranking's position in the list and its provenance."""
    meta = examples[position].meta or {}
    where = ", ".join(f"{key} {meta[key]!r}" for key in ("source", "index") if key in meta)
    return f"record {position}" + (f" ({where})" if where else "")
