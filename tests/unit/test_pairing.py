"""Pair builders: which pairs each strategy makes, ties, scores carried, and pairs_for_loss."""

from __future__ import annotations

import random

import pytest

from alignexp.losses import get_loss
from alignexp.sampling.pairing import PAIR_STRATEGIES, check_scores, make_pairs, pairs_for_loss
from alignexp.tasks.base import RankedExample


def ranked(n: int, scores: list[float] | str | None = "default", **kwargs) -> RankedExample:
    """Responses 'r0'..'r{n-1}', best first; default scores n-1 .. 0."""
    if scores == "default":
        scores = [float(n - 1 - k) for k in range(n)]
    return RankedExample("prompt", [f"r{k}" for k in range(n)], scores=scores, **kwargs)


def names(pairs: list[RankedExample]) -> list[tuple[str, str]]:
    return [tuple(p.responses) for p in pairs]


def test_best_worst():
    assert names(make_pairs(ranked(4), "best_worst")) == [("r0", "r3")]


def test_adjacent():
    assert names(make_pairs(ranked(4), "adjacent")) == [("r0", "r1"), ("r1", "r2"), ("r2", "r3")]


def test_all():
    assert names(make_pairs(ranked(4), "all")) == [
        ("r0", "r1"), ("r0", "r2"), ("r0", "r3"), ("r1", "r2"), ("r1", "r3"), ("r2", "r3")]


def test_first_round_pairs_consecutive_candidates():
    """RSO's first-round ranking: (y1, y2), (y3, y4), ...; an odd one out makes no pair."""
    assert names(make_pairs(ranked(8), "first_round")) == [("r0", "r1"), ("r2", "r3"), ("r4", "r5"), ("r6", "r7")]
    assert names(make_pairs(ranked(5), "first_round")) == [("r0", "r1"), ("r2", "r3")]


def test_tournament_advances_the_winners():
    """RSO's tournament ranking with 8 candidates: 4 + 2 + 1 = 7 matches, winners advancing.
    Candidates in the order (r3, r0, r5, r1, r7, r2, r4, r6) (scores 7 - k):
    round 1: (r3 r0) -> r0, (r5 r1) -> r1, (r7 r2) -> r2, (r4 r6) -> r4;
    round 2: (r0 r1) -> r0, (r2 r4) -> r2;  final: (r0 r2)."""
    order = [3, 0, 5, 1, 7, 2, 4, 6]
    ex = RankedExample("prompt", [f"r{k}" for k in order], scores=[7.0 - k for k in order])
    assert names(make_pairs(ex, "tournament")) == [
        ("r0", "r3"), ("r1", "r5"), ("r2", "r7"), ("r4", "r6"), ("r0", "r1"), ("r2", "r4"), ("r0", "r2")]


def test_tournament_bye_for_odd_rounds():
    """5 candidates in ranked order: (r0 r1) (r2 r3), r4 has a bye; then (r0 r2), r4 a bye; then (r0 r4)."""
    assert names(make_pairs(ranked(5), "tournament")) == [("r0", "r1"), ("r2", "r3"), ("r0", "r2"), ("r0", "r4")]


def test_rng_shuffles_the_rso_strategies_reproducibly():
    """With an rng the candidates are shuffled first (RSO's samples come unordered); the same seed
    gives the same pairs, an int is a seed, and every pair stays best first."""
    ex = ranked(8)
    a = make_pairs(ex, "tournament", rng=random.Random(3))
    assert names(a) == names(make_pairs(ex, "tournament", rng=3))
    assert len(a) == 7 and names(a) != names(make_pairs(ex, "tournament"))
    assert all(p.scores[0] > p.scores[1] for p in a)
    assert names(make_pairs(ex, "adjacent", rng=3)) == names(make_pairs(ex, "adjacent"))  # rng only for RSO's


@pytest.mark.parametrize("strategy", PAIR_STRATEGIES)
def test_pairs_are_best_first_with_scores_target_and_meta(strategy):
    ex = ranked(4, target="gold", meta={"source": "s", "index": 7})
    pairs = make_pairs(ex, strategy, rng=random.Random(0))
    assert pairs
    for pair in pairs:
        i, j = pair.meta["pair"]
        assert pair.n == 2 and pair.responses == [ex.responses[i], ex.responses[j]]
        assert pair.scores == [ex.scores[i], ex.scores[j]] and pair.scores[0] > pair.scores[1]
        assert pair.target == "gold" and pair.prompt == "prompt"
        assert pair.meta["source"] == "s" and pair.meta["index"] == 7
    assert "pair" not in ex.meta  # the input is not modified


def test_ties_make_no_pair():
    """Scores (3, 2, 2, 1): the two 2s tie. adjacent keeps (r0 r1), (r2 r3); all drops (r1 r2);
    first_round (r0 r1), (r2 r3); tournament: (r0 r1) -> r0, (r2 r3) -> r2, final (r0 r2).
    All tied: nothing."""
    ex = ranked(4, scores=[3.0, 2.0, 2.0, 1.0])
    assert names(make_pairs(ex, "adjacent")) == [("r0", "r1"), ("r2", "r3")]
    assert ("r1", "r2") not in names(make_pairs(ex, "all")) and len(make_pairs(ex, "all")) == 5
    assert names(make_pairs(ex, "best_worst")) == [("r0", "r3")]
    tied = ranked(3, scores=[1.0, 1.0, 1.0])
    assert all(make_pairs(tied, s) == [] for s in PAIR_STRATEGIES)


def test_tied_match_sends_the_first_player_on():
    """Scores (2, 2, 1, 0) in a tournament: (r0 r1) tie, no pair, r0 advances; (r2 r3) -> r2; final (r0 r2)."""
    assert names(make_pairs(ranked(4, scores=[2.0, 2.0, 1.0, 0.0]), "tournament")) == [("r2", "r3"), ("r0", "r2")]


def test_without_scores_the_ranking_order_decides():
    ex = ranked(3, scores=None)
    assert names(make_pairs(ex, "all")) == [("r0", "r1"), ("r0", "r2"), ("r1", "r2")]
    assert all(p.scores is None for p in make_pairs(ex, "all"))


def test_single_response_gives_no_pair():
    assert all(make_pairs(ranked(1), s) == [] for s in PAIR_STRATEGIES)


def test_unknown_strategy_names_pairs():
    with pytest.raises(ValueError, match="pairs must be one of best_worst, adjacent, all, first_round, tournament"):
        make_pairs(ranked(3), "random")
    with pytest.raises(ValueError, match="pairs"):
        pairs_for_loss([ranked(3)], get_loss("ranked_dpo"), "nope")


def test_pairs_for_loss():
    """Listwise losses (and sft, which reads column 0) get the examples untouched; pairwise ones the pairs."""
    examples = [ranked(3), ranked(4)]
    assert pairs_for_loss(examples, get_loss("ranked_dpo"), "all") is examples
    assert pairs_for_loss(examples, get_loss("sft"), "all") is examples
    pairs = pairs_for_loss(examples, get_loss("dpo"), "adjacent")
    assert names(pairs) == [("r0", "r1"), ("r1", "r2"), ("r0", "r1"), ("r1", "r2"), ("r2", "r3")]
    assert len(pairs_for_loss(examples, get_loss("slic"), "best_worst")) == 2
    seeded = pairs_for_loss(examples, get_loss("hinge"), "tournament", rng=5)
    assert names(seeded) == names(pairs_for_loss(examples, get_loss("hinge"), "tournament", rng=5))


@pytest.mark.parametrize("name", ["rrhf", "pro", "lipo", "ranked_dpo", "reward"])
def test_a_mix_of_scored_and_unscored_rankings_names_the_record(name):
    """Record 2 has no scores after two scored ones: the error names it by position and provenance,
    and the first scored record it conflicts with; an unscored first record names the scored one."""
    examples = [ranked(3, meta={"source": "a.jsonl", "index": 0}), ranked(3, meta={"source": "a.jsonl", "index": 1}),
                ranked(3, scores=None, meta={"source": "b.jsonl", "index": 7})]
    with pytest.raises(ValueError, match=r"record 2 \(source 'b.jsonl', index 7\) has no scores while "
                                         rf"record 0 \(source 'a.jsonl', index 0\) has; loss '{name}'"):
        check_scores(examples, get_loss(name))
    with pytest.raises(ValueError, match=r"record 0 has no scores while record 1 has"):
        check_scores([ranked(2, scores=None), ranked(2)], get_loss(name))
    check_scores(examples[:2], get_loss(name))  # all scored
    check_scores([ranked(3, scores=None)] * 2, get_loss(name))  # none scored
    check_scores([], get_loss(name))


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "hinge", "sft"])
def test_losses_that_ignore_scores_accept_a_mix(name):
    """Pairwise losses read pairs ordered by the pair builders one ranking at a time; sft reads column 0."""
    check_scores([ranked(3), ranked(3, scores=None)], get_loss(name))
