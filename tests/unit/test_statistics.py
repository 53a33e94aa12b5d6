"""Statistics that every comparison relies on, against values worked out by hand: clustered standard
errors (and a simulation of their coverage), Student's t, t-intervals over seeds, the paired t-test,
interpolation on a frontier and bootstrap bands (alignexp/metrics/stats.py, alignexp/metrics/seeds.py)."""

from __future__ import annotations

import math
import random

import pytest

from alignexp.metrics.preference import agreement, ranking_accuracy, ranking_verdicts
from alignexp.metrics.seeds import (
    bootstrap_mean_band,
    holm,
    interpolate,
    paired_t_test,
    seeds_for_half_width,
    t_interval,
    verdict,
)
from alignexp.metrics.stats import (
    clustered_mean_stderr,
    mean_stderr,
    student_t_cdf,
    student_t_quantile,
    wilson_interval,
)


def test_clustered_stderr_by_hand():
    """Values (1, 1, 0 | 1 | 0, 0) in clusters (a, a, a, b, c, c): mean 0.5; residual sums per cluster
    e = (0.5 + 0.5 - 0.5, 0.5, -0.5 - 0.5) = (0.5, 0.5, -1); SE^2 = G/(G-1) sum e^2 / N^2
    = 3/2 * 1.5 / 36 = 0.0625, SE = 0.25. As six independent values: s^2 = 1.5/5 = 0.3, SE = sqrt(0.3/6)
    = 0.223607. One value per cluster gives exactly the plain stderr."""
    values, clusters = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], list("aaabcc")
    assert clustered_mean_stderr(values, clusters) == (0.5, pytest.approx(0.25), 3)
    assert mean_stderr(values)[1] == pytest.approx(math.sqrt(0.3 / 6))
    assert clustered_mean_stderr(values, range(6))[1] == pytest.approx(mean_stderr(values)[1])
    assert clustered_mean_stderr([0.3, 0.9], ["x", "x"]) == (pytest.approx(0.6), 0.0, 1)
    with pytest.raises(ValueError, match="6 values but 5 cluster labels"):
        clustered_mean_stderr(values, clusters[:5])


def test_agreement_clustered_by_hand():
    """The same verdicts from three rankings: n_eff = p(1-p)/SE^2 = 0.25/0.0625 = 4, so the Wilson
    interval of 2 successes in 4: centre (0.5 + z^2/8)/(1 + z^2/4) = 0.5, half-width
    z/(1 + z^2/4) sqrt(0.25/4 + z^2/64) = 0.999795 * 0.350033 = 0.349961 -> [0.150039, 0.849961],
    wider than the independent-pairs interval at n = 6."""
    verdicts, clusters = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 2, 2]
    out = agreement(verdicts, clusters)
    assert out["stderr"] == pytest.approx(0.25) and out["n_clusters"] == 3 and out["n"] == 6
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(0.150039, abs=1e-6), pytest.approx(0.849961, abs=1e-6))
    plain = agreement(verdicts)
    assert (plain["ci_low"], plain["ci_high"]) == pytest.approx(wilson_interval(3, 6))
    assert plain["ci_high"] - plain["ci_low"] < out["ci_high"] - out["ci_low"]


def test_ranking_accuracy_is_clustered_by_ranking():
    """Rankings [[3, 2, 1], [1, 2, 3]]: verdicts (1, 1, 1 | 0, 0, 0), mean 0.5; clusters e = (1.5, -1.5):
    SE^2 = 2/1 * 4.5 / 36 = 0.25, SE = 0.5; interval 0.5 ± t_{0.975, 1} * 0.5 = 0.5 ± 6.353102."""
    out = ranking_accuracy([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert out["preference_accuracy"] == 0.5 and out["preference_accuracy_stderr"] == pytest.approx(0.5)
    assert out["preference_accuracy_ci_high"] == pytest.approx(0.5 + 12.706205 * 0.5, abs=1e-5)
    assert (out["preference_accuracy_n_pairs"], out["preference_accuracy_n_rankings"]) == (6, 2)


def test_clustered_intervals_cover_the_truth_95_percent_of_the_time():
    """1000 simulated evaluations of 100 rankings of 2 to 5 responses each. Per ranking, the scorer orders
    all of it correctly with probability 0.6 and otherwise at random (each pair right with probability
    1/2), so the verdicts of one ranking are strongly correlated and the true accuracy is exactly
    0.6 + 0.4 * 0.5 = 0.8 (both parts scale with the number of pairs). The 95% intervals of
    ``ranking_accuracy`` and of ``agreement(..., clusters)`` must cover 0.8 in 93% to 97% of the runs;
    the interval that takes the pairs as independent covers it far less often (about 68%)."""
    rng = random.Random(0)
    runs, truth = 1000, 0.8
    covered = {"ranking_accuracy": 0, "agreement": 0, "independent": 0}
    for _ in range(runs):
        scores = []
        for _ in range(100):
            row = [float(k) for k in range(rng.randint(2, 5), 0, -1)]
            if rng.random() >= 0.6:
                rng.shuffle(row)
            scores.append(row)
        out = ranking_accuracy(scores)
        covered["ranking_accuracy"] += out["preference_accuracy_ci_low"] <= truth <= out["preference_accuracy_ci_high"]
        per_ranking = ranking_verdicts(scores)
        verdicts = [v for row in per_ranking for v in row]
        clusters = [k for k, row in enumerate(per_ranking) for _ in row]
        together = agreement(verdicts, clusters)
        covered["agreement"] += together["ci_low"] <= truth <= together["ci_high"]
        alone = agreement(verdicts)
        covered["independent"] += alone["ci_low"] <= truth <= alone["ci_high"]
    rates = {k: v / runs for k, v in covered.items()}
    print(rates)
    assert 0.93 <= rates["ranking_accuracy"] <= 0.97, rates
    assert 0.93 <= rates["agreement"] <= 0.97, rates
    assert rates["independent"] < 0.85, rates


def test_student_t_against_closed_forms():
    """df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi, quantile tan(pi (p - 1/2)); df = 2: F(t) = 1/2 + t/(2 sqrt(2 + t^2)),
    quantile q sqrt(2 / (1 - q^2)) with q = 2p - 1 (0.975 -> 4.302653); table value t_{0.975, 4} = 2.776445;
    df -> infinity gives the normal 1.959964."""
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-8)
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), abs=1e-9)
    assert student_t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError, match="p must be in"):
        student_t_quantile(1.0, 3)


def test_t_interval_by_hand():
    """(0.40, 0.50, 0.60): mean 0.5, s = 0.1, stderr 0.1/sqrt 3 = 0.057735, half-width 4.302653 * 0.057735
    = 0.248414. One seed has no interval."""
    out = t_interval([0.4, 0.5, 0.6])
    assert (out.mean, out.n) == (pytest.approx(0.5), 3)
    assert (out.low, out.high) == (pytest.approx(0.251586, abs=1e-6), pytest.approx(0.748414, abs=1e-6))
    assert out.stderr == pytest.approx(0.057735, abs=1e-6)
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high)


def test_paired_t_test_by_hand():
    """a = (0.50, 0.55, 0.60), b = (0.45, 0.47, 0.49): d = (0.05, 0.08, 0.11), mean 0.08, s_d = 0.03,
    stderr 0.017321, t = 4.618802 on 2 df, p = 2 (1 - F(t)) = 1 - t / sqrt(2 + t^2) = 0.043817 (df = 2
    closed form), interval 0.08 ± 4.302653 * 0.017321 = [0.005476, 0.154524].
    Unpaired, the same numbers would not be significant: pairing removes the seeds' shared part."""
    out = paired_t_test([0.50, 0.55, 0.60], [0.45, 0.47, 0.49])
    t = 0.08 / (0.03 / math.sqrt(3))
    assert out.t == pytest.approx(t) and out.df == 2 and out.n == 3 and out.test == "paired t-test"
    assert out.difference == pytest.approx(0.08)
    assert out.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert out.p_value == pytest.approx(0.043817, abs=1e-6)
    assert (out.low, out.high) == (pytest.approx(0.005476, abs=1e-6), pytest.approx(0.154524, abs=1e-6))
    same = paired_t_test([0.1, 0.2], [0.0, 0.1])
    assert same.p_value == 0.0 and same.low == same.high == pytest.approx(0.1)
    assert paired_t_test([0.2, 0.3], [0.2, 0.3]).p_value == 1.0
    assert math.isnan(paired_t_test([0.5], [0.4]).p_value)
    with pytest.raises(ValueError, match="differ in length"):
        paired_t_test([0.1, 0.2], [0.1])


def test_holm_by_hand():
    """(0.01, 0.04, 0.03): sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04; made non-decreasing in that
    order, 0.04 becomes 0.06. Capped at 1: (0.5, 0.6) -> 0.5 x 2 = 1.0, 0.6 raised to 1.0."""
    assert holm([0.01, 0.04, 0.03]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06)]
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.02]) == [0.02] and holm([]) == []
    # Holm never adjusts below the raw p, nor above Bonferroni's m p
    ps = [0.001, 0.2, 0.013, 0.04, 0.3]
    assert all(p <= a <= min(1.0, len(ps) * p) for p, a in zip(ps, holm(ps)))


def test_verdict_rules():
    assert verdict(+0.1, 0.2, 0.01, margin=0.05) == "better"
    assert verdict(-0.1, -0.02, 0.01, margin=0.05) == "worse"
    assert verdict(+0.1, 0.2, 0.03, margin=0.05, alpha=0.025) == "inconclusive"  # a stricter alpha holds back
    assert verdict(-0.01, 0.04, 0.3, margin=0.05) == "no better"  # the whole interval below the margin
    assert verdict(-0.01, 0.06, 0.3, margin=0.05) == "inconclusive"


def test_seeds_for_half_width_by_hand():
    """Half-width 0.3 with 3 seeds: s = 0.3 sqrt(3) / 4.302653 = 0.120766; 8 seeds give 2.364624 x 0.120766 /
    sqrt(8) = 0.100963 > 0.1, 9 give 2.306004 x 0.120766 / 3 = 0.092829: 9. Half-width 0.4 with 5 seeds:
    s = 0.4 sqrt(5) / 2.776445 = 0.322148; 42 give 2.019541 x 0.322148 / sqrt(42) = 0.100388, 43 give
    2.018082 x 0.322148 / sqrt(43) = 0.099143: 43, under 16 x 5 because the t quantile falls with the seeds.
    A half-width already at the target needs the seeds it had."""
    assert seeds_for_half_width(0.3, 3, 0.1) == 9
    assert seeds_for_half_width(0.4, 5, 0.1) == 43
    assert seeds_for_half_width(0.1, 3, 0.1) == 3
    with pytest.raises(ValueError, match="n >= 2"):
        seeds_for_half_width(0.3, 1, 0.1)


def test_interpolate_never_extrapolates():
    """Points (1, 0.2), (3, 0.6), (2, 0.5) sorted by x: at 1.5 -> 0.35; at 2.5 -> 0.55; at 3 -> 0.6;
    outside [1, 3] -> None; two points at one x are averaged; a single point is defined at its own x only."""
    xs, ys = [1.0, 3.0, 2.0], [0.2, 0.6, 0.5]
    assert interpolate(xs, ys, 1.5) == pytest.approx(0.35)
    assert interpolate(xs, ys, 2.5) == pytest.approx(0.55)
    assert interpolate(xs, ys, 3.0) == pytest.approx(0.6)
    assert interpolate(xs, ys, 0.99) is None and interpolate(xs, ys, 3.01) is None
    assert interpolate([1.0, 1.0, 2.0], [0.0, 0.2, 0.3], 1.5) == pytest.approx(0.2)
    assert interpolate([2.0], [0.4], 2.0) == 0.4 and interpolate([2.0], [0.4], 2.1) is None
    assert interpolate([], [], 1.0) is None


def test_bootstrap_mean_band():
    """Curves (1, 2), (2, 3), (3, 4) on a 2-point grid. A resample of three curves averages to 1 at grid
    point 0 only when it picks the first curve three times, probability 1/27 = 3.7%: more than 2.5%, so
    the 2.5% quantile of 2000 resamples is 1, and by symmetry the 97.5% quantile is 3 (at point 1: 2 and 4).
    Identical curves give a band of width 0; the band reproduces with its seed and holds the mean."""
    low, high = bootstrap_mean_band([[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]])
    assert low == [1.0, 2.0] and high == [3.0, 4.0]
    assert bootstrap_mean_band([[0.5, 0.1]] * 4) == ([0.5, 0.1], [0.5, 0.1])
    curves = [[random.Random(k).random()] for k in range(10)]
    assert bootstrap_mean_band(curves, seed=3) == bootstrap_mean_band(curves, seed=3)
    band = bootstrap_mean_band(curves, seed=3)
    mean = sum(c[0] for c in curves) / 10
    assert band[0][0] < mean < band[1][0]
    with pytest.raises(ValueError, match="same grid"):
        bootstrap_mean_band([[1.0], [1.0, 2.0]])
