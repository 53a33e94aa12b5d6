"""The length-controlled win rate (AlpacaEval 2's GLM, alignexp/metrics/length_control.py)."""

from __future__ import annotations

import math
import random

import pytest

from alignexp.metrics.length_control import C, length_controlled_win_rate, length_features
from alignexp.metrics.winrate import win_rate_from_verdicts

N = 2000


def lengths(rng: random.Random, n: int = N) -> tuple[list[int], list[int]]:
    """First responses mostly longer than second ones (about 70% of pairs), as a verbose policy's are."""
    first = [rng.randint(20, 400) for _ in range(n)]
    second = [max(1, a + rng.randint(-150, 60)) for a in first]
    return first, second


def test_hand_worked_without_length_differences():
    """All lengths equal: the length feature is 0 and the model is sigmoid(theta_q). 70 wins of 100:
    the penalised score equation n (p - 0.7) + theta_q / C = 0 with C = 100 gives theta_q = 0.846892,
    p = 0.699915 (the plain MLE, 0.7, moved by 1e-4 towards 0.5). Its sandwich variance is
    sum (p - w_i)^2 / (n p (1 - p) + 1/C)^2 = 21.0 / 21.0^2, so the stderr on the win-rate scale is
    p (1 - p) sqrt(1 / 21.0) = 0.0458, the binomial sqrt(0.21 / 100)."""
    wins = [1.0] * 70 + [0.0] * 30
    out = length_controlled_win_rate(wins, [5] * 100, [5] * 100, prefix="w")
    p = out["w_lc"]
    assert 100 * (p - 0.7) + math.log(p / (1 - p)) / C == pytest.approx(0.0, abs=1e-9)
    assert p == pytest.approx(0.699915, abs=1e-6)
    assert out["w_lc_stderr"] == pytest.approx(math.sqrt(0.21 / 100), rel=1e-3)
    assert out["w_lc_ci_low"] < p < out["w_lc_ci_high"] and out["w_lc_length_coef"] == 0.0


def test_features_are_tanh_of_the_standardised_difference():
    """d = (2, -2, 0): sample std 2, so tanh(1), tanh(-1), 0."""
    assert length_features([4, 1, 3], [2, 3, 3]) == pytest.approx([math.tanh(1), -math.tanh(1), 0.0])


def test_length_alone_decides_the_judge():
    """2,000 seeded pairs where the longer response always wins (equal lengths tie): the raw win rate
    is that of the longer one (about 0.7), the length-controlled one is 0.5."""
    rng = random.Random(0)
    first, second = lengths(rng)
    wins = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(first, second)]
    raw = sum(wins) / N
    out = length_controlled_win_rate(wins, first, second)
    assert raw > 0.65
    assert abs(out["win_rate_lc"] - 0.5) < 0.03
    assert out["win_rate_lc_length_coef"] > 5  # the judge's preference is the length term


def test_a_noisy_judge_that_only_looks_at_length():
    """The judge prefers the first response with probability sigmoid(3 tanh(d / s_d)), nothing else:
    the quality term is 0 by construction, so LC is 0.5 within its interval."""
    rng = random.Random(1)
    first, second = lengths(rng)
    features = length_features(first, second)
    wins = [1.0 if rng.random() < 1 / (1 + math.exp(-3 * f)) else 0.0 for f in features]
    out = length_controlled_win_rate(wins, first, second)
    assert sum(wins) / N > 0.65
    assert abs(out["win_rate_lc"] - 0.5) < 0.03
    assert out["win_rate_lc_ci_low"] < 0.5 < out["win_rate_lc_ci_high"]


def test_quality_decides_regardless_of_length():
    """The first response is better on 70% of prompts, drawn independently of the lengths, and the judge
    follows quality: the length-controlled win rate stays near the raw one."""
    rng = random.Random(2)
    first, second = lengths(rng)
    wins = [1.0 if rng.random() < 0.7 else 0.0 for _ in range(N)]
    raw = sum(wins) / N
    out = length_controlled_win_rate(wins, first, second)
    assert abs(out["win_rate_lc"] - raw) < 0.03
    assert out["win_rate_lc_ci_low"] < raw < out["win_rate_lc_ci_high"]


def test_beside_the_raw_win_rate_and_bad_input():
    out = win_rate_from_verdicts([1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.5], prefix="wr",
                                 first_lengths=[10, 3, 12, 9], second_lengths=[4, 8, 5, 9])
    assert out["wr"] == pytest.approx((1 + 0 + 1 + 0.75) / 4) and "wr_lc" in out and "wr_lc_stderr" in out
    assert "wr_lc" not in win_rate_from_verdicts([1.0], [0.0], prefix="wr")  # no lengths, no LC
    assert length_controlled_win_rate([], [], []) == {}
    with pytest.raises(ValueError, match="2 verdicts, 1 and 2 lengths"):
        length_controlled_win_rate([1.0, 0.0], [3], [4, 5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        length_controlled_win_rate([2.0], [3], [4])
