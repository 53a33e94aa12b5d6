"""Metrics against values worked out by hand (alignexp/metrics/)."""

from __future__ import annotations

import math

import pytest

from alignexp.judges.base import ScoreJudge
from alignexp.metrics.overlap import (
    corpus_scores,
    plain_text,
    reference_metrics,
    sentence_bleu,
    sentence_rouge,
)
from alignexp.metrics.preference import (
    LabelledPair,
    agreement,
    labelled_pairs,
    pairs_from_rankings,
    ranking_accuracy,
)
from alignexp.metrics.reward import best_of_n_indices, best_of_n_kl, length_stats
from alignexp.metrics.stats import bootstrap_interval, mean_stderr, summary, wilson_interval
from alignexp.metrics.winrate import both_orders_verdicts, win_rate
from alignexp.tasks.base import RankedExample

HYP = "the cat sat on the mat"
REF = "the cat sat on the red mat"


def test_bleu_with_brevity_penalty_by_hand():
    """Hypothesis of 6 words, reference of 7 ("red" missing).

    Clipped n-gram precisions: 1-grams 6/6; 2-grams 4/5 (all but "the mat"); 3-grams 3/4 (all but
    "on the mat"); 4-grams 2/3 (all but "sat on the mat"). Geometric mean: (1 * 4/5 * 3/4 * 2/3)^(1/4)
    = 0.4^(1/4) = 0.795270. Brevity penalty: c = 6 < r = 7, so exp(1 - 7/6) = 0.846482.
    BLEU = 100 * 0.795270 * 0.846482 = 67.318.
    """
    expected = 100 * 0.4 ** 0.25 * math.exp(1 - 7 / 6)
    assert expected == pytest.approx(67.318, abs=1e-3)
    scores = corpus_scores([HYP], [REF])
    assert scores["bleu"] == pytest.approx(expected, abs=1e-2)
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert "chrF" not in scores["bleu_signature"] and scores["chrf_signature"].startswith("nrefs:1|case:mixed")
    # Sentence-level BLEU has no zero counts here, so smoothing does not apply: the same value.
    assert sentence_bleu([HYP], [REF])[0] == pytest.approx(expected, abs=1e-2)


def test_ter_and_chrf_by_hand():
    """TER = edits / reference words: one insertion ("red") over 7 words = 14.286. chrF of a
    perfect match is 100, of no shared character n-gram 0."""
    assert corpus_scores([HYP], [REF])["ter"] == pytest.approx(100 / 7, abs=1e-2)
    assert corpus_scores([REF], [REF])["chrf"] == pytest.approx(100.0)
    assert corpus_scores(["xyz"], ["abc"])["chrf"] == pytest.approx(0.0)


def test_rouge_f_measures_by_hand():
    """ROUGE-1: 6 shared unigrams, P = 6/6, R = 6/7, F = 2PR/(P+R) = 12/13 = 92.308.
    ROUGE-2: hypothesis bigrams 5, reference bigrams 6, shared 4 (the cat, cat sat, sat on, on the):
    F = 2 (4/5)(4/6) / (4/5 + 4/6) = 8/11 = 72.727. ROUGE-L: LCS = the whole hypothesis, 6 words:
    F = 12/13 = 92.308."""
    scores = sentence_rouge([HYP], [REF])
    assert scores["rouge_1"][0] == pytest.approx(100 * 12 / 13)
    assert scores["rouge_2"][0] == pytest.approx(100 * 8 / 11)
    assert scores["rouge_l"][0] == pytest.approx(100 * 12 / 13)


def test_rouge_l_differs_from_rouge_1_when_order_changes():
    """"mat the on sat cat the" shares all 6 unigrams with HYP (ROUGE-1 = 100) but its longest common
    subsequence with "the cat sat on the mat" is 3 words ("the sat the", "the on the"): P = R = 3/6,
    F = 50."""
    scores = sentence_rouge(["mat the on sat cat the"], [HYP])
    assert scores["rouge_1"][0] == pytest.approx(100.0)
    assert scores["rouge_l"][0] == pytest.approx(50.0)


def test_reference_metrics_takes_messages_and_gives_means_with_stderr():
    chat = [{"role": "user", "content": "say it"}, {"role": "assistant", "content": HYP}]
    assert plain_text(chat) == HYP
    out = reference_metrics([chat, REF], [REF, REF], bootstrap=20, seed=0)
    assert out["rouge_l"] == pytest.approx((100 * 12 / 13 + 100) / 2)
    assert out["rouge_l_stderr"] > 0
    assert out["bleu_ci_low"] <= out["bleu"] <= out["bleu_ci_high"]
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_scores([HYP, HYP], [REF])


def test_stats():
    assert mean_stderr([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1 / math.sqrt(3)))
    assert mean_stderr([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_stderr([]))
    assert summary("x", [0.0, 1.0]) == {"x": 0.5, "x_stderr": pytest.approx(0.5)}
    # Wilson: k = 8, n = 10, z = 1.96 -> centre 0.7167, half-width 0.2266 (see the docstring).
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert bootstrap_interval([2.0] * 10, lambda xs: sum(xs) / len(xs), n_resamples=50) == (2.0, 2.0)
    a = bootstrap_interval(list(range(20)), lambda xs: sum(xs) / len(xs), n_resamples=100, seed=3)
    assert a == bootstrap_interval(list(range(20)), lambda xs: sum(xs) / len(xs), n_resamples=100, seed=3)
    assert a[0] < 9.5 < a[1]


class FirstPositionJudge:
    """A deliberately position-biased judge: prefers the longer response when it is clearly longer
    (by more than 3 characters); otherwise it says the response shown first wins."""

    name = "first_position"

    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]

    def compare(self, prompts, first, second):
        self.calls += 1
        return [1.0 if len(a) > len(b) + 3 else 0.0 if len(b) > len(a) + 3 else 1.0 for a, b in zip(first, second)]


def test_win_rate_judges_both_orders_and_cancels_position_bias():
    """Four pairs: the policy's response is clearly longer in pairs 0-1 (a win in either order) and
    about as long in pairs 2-3, where the biased judge always picks the first shown. One order would
    give the policy 4/4. Both orders: pairs 0-1 give (1 + 1 - 0)/2 = 1; pairs 2-3 give
    (1 + 1 - 1)/2 = 0.5 (a tie). Win rate = (1 + 1 + 0.5 + 0.5)/4 = 0.75. The response shown first
    wins mean((f + s)/2) = (0.5 + 0.5 + 1 + 1)/4 = 0.75 of the time (first_position_rate); the
    verdict survives the swap in 2 of 4 pairs (consistency 0.5)."""
    judge = FirstPositionJudge()
    prompts = ["p"] * 4
    policy = ["a long answer", "another long one", "abc", "abcd"]
    baseline = ["short", "tiny", "abd", "abc"]
    forward, swapped = both_orders_verdicts(judge, prompts, policy, baseline, batch_size=3)
    assert forward == [1.0, 1.0, 1.0, 1.0] and swapped == [0.0, 0.0, 1.0, 1.0]
    assert judge.calls == 4  # two batches (3 + 1) in each order
    out = win_rate(judge, prompts, policy, baseline, prefix="win_rate_vs_reference", batch_size=64)
    assert out["win_rate_vs_reference"] == pytest.approx(0.75)
    assert out["win_rate_vs_reference_stderr"] == pytest.approx(mean_stderr([1, 1, 0.5, 0.5])[1])
    assert out["win_rate_vs_reference_first_position_rate"] == pytest.approx(0.75)
    assert out["win_rate_vs_reference_consistency"] == pytest.approx(0.5)
    assert out["win_rate_vs_reference_n"] == 4
    # Swapping the roles gives the complement: a both-orders win rate is antisymmetric.
    assert win_rate(judge, prompts, baseline, policy)["win_rate"] == pytest.approx(0.25)


def test_win_rate_counts_ties_as_half_with_a_scoring_judge():
    class Length(ScoreJudge):
        name = "length"

        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    judge = Length()
    out = win_rate(judge, ["p", "p", "p"], ["aa", "a", "aaa"], ["a", "a", "aaaa"])
    assert out["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["win_rate_first_position_rate"] == pytest.approx(0.5)
    assert out["win_rate_consistency"] == 1.0


def test_win_rate_rejects_a_judge_that_returns_the_wrong_count():
    class Broken:
        name = "broken"

        def compare(self, prompts, first, second):
            return [1.0]

    with pytest.raises(ValueError, match="returned 1 values for 2 inputs"):
        win_rate(Broken(), ["p", "q"], ["a", "b"], ["c", "d"])


def test_ranking_accuracy_by_hand():
    """Scores [3, 1, 2] for a ranking of 3 (best first): pairs (0,1) 3 > 1 agree, (0,2) 3 > 2 agree,
    (1,2) 1 < 2 disagree -> 2/3. A second ranking [1, 1] is a tie -> 0.5. Over 4 pairs:
    (1 + 1 + 0 + 0.5)/4 = 0.625. Labels that tie (scores [0.2, 0.2, 0.1]) leave out pair (0,1)."""
    out = ranking_accuracy([[3.0, 1.0, 2.0]])
    assert out["preference_accuracy"] == pytest.approx(2 / 3) and out["preference_accuracy_n_pairs"] == 3
    assert out["preference_accuracy_n_rankings"] == 1
    assert ranking_accuracy([[3.0, 1.0, 2.0], [1.0, 1.0]])["preference_accuracy"] == pytest.approx(0.625)
    assert labelled_pairs(3, [0.2, 0.2, 0.1]) == [(0, 2), (1, 2)]
    tied = ranking_accuracy([[3.0, 1.0, 2.0]], [[0.2, 0.2, 0.1]], prefix="acc")
    assert tied["acc"] == pytest.approx(0.5) and tied["acc_n_pairs"] == 2


def test_agreement_and_pairs_from_rankings():
    """Verdicts [1, 1, 1, 0.5, 0]: agreement 3.5/5 = 0.7, one tie, the Wilson interval of 3.5/5."""
    out = agreement([1.0, 1.0, 1.0, 0.5, 0.0])
    assert out["agreement"] == pytest.approx(0.7) and out["ties"] == 1 and out["n"] == 5
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(wilson_interval(3.5, 5))
    examples = [RankedExample("x", ["a", "b", "c"], scores=[2.0, 1.0, 1.0]),
                RankedExample("y", ["d", "e"], target="gold y")]
    pairs = pairs_from_rankings(examples, references={"x": "gold x"})
    assert pairs == [LabelledPair("x", "a", "b", "gold x", 0), LabelledPair("x", "a", "c", "gold x", 0),
                     LabelledPair("y", "d", "e", "gold y", 1)]


def test_best_of_n():
    """KL_bon = log N - (N - 1)/N: N = 1 -> 0; N = 4 -> 1.386294 - 0.75 = 0.636294."""
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        best_of_n_kl(0)
    scores = [[0.1, 0.9, 0.5, 2.0], [1.0, 1.0, 0.0, 0.0]]
    assert best_of_n_indices(scores, 2) == [1, 0]  # first on ties
    assert best_of_n_indices(scores, 4) == [3, 0]
    with pytest.raises(ValueError, match="best-of-5 needs 5 samples"):
        best_of_n_indices(scores, 5)


def test_length_stats():
    out = length_stats(["a b c", "d"], token_counts=[4, 2], finished=[True, False])
    assert out["response_words"] == 2.0 and out["response_chars"] == 3.0
    assert out["response_tokens"] == 3.0 and out["response_tokens_median"] == 3.0
    assert out["response_tokens_max"] == 4.0 and out["truncated_fraction"] == 0.5
    assert length_stats(["a b", "c d e"])["response_words_median"] == 2.5
