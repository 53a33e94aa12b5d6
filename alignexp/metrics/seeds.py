"""Statistics over seeds (replicate runs of one configuration): Student-t intervals, the paired t-test,
linear interpolation on a frontier that never extrapolates, and percentile bootstrap bands of a mean curve."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from alignexp.metrics.stats import mean_stderr, student_t_cdf, student_t_quantile

NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` replicates, its standard error and its confidence interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int
    stderr: float = NAN


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` with the Student-t interval mean ± t_{(1+level)/2, n-1} s / sqrt(n).

    The exact interval for the mean of normal replicates whose spread is estimated from them
    (Student 1908); with 3 seeds t_{0.975, 2} = 4.302653. Example: (0.40, 0.50, 0.60) give mean 0.5,
    s = 0.1, stderr 0.057735, interval 0.5 ± 0.248414 = [0.251586, 0.748414]. One value: its
    interval is (nan, nan); none: everything nan.
    """
    n = len(values)
    mean, stderr = mean_stderr(values)
    if n < 2:
        return Interval(mean, NAN, NAN, n, NAN)
    half = student_t_quantile((1 + level) / 2, n - 1) * stderr
    return Interval(mean, mean - half, mean + half, n, stderr)


def proportion_t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """:func:`t_interval` for proportions (win rates, accuracies: each value in [0, 1]), the interval
    intersected with [0, 1].

    The mean of a proportion lies in [0, 1], so cutting the interval to [0, 1] removes only values the mean
    cannot take: the interval still covers the true mean whenever the t-interval does (the same coverage),
    and no printed bound is an impossible one. Example: (0.95, 0.99, 1.00) give mean 0.98, stderr 0.015275,
    t-interval 0.98 ± 4.302653 x 0.015275 = [0.914, 1.046], printed [0.914, 1.000].
    """
    interval = t_interval(values, level)
    if math.isnan(interval.low):
        return interval
    return Interval(interval.mean, max(0.0, interval.low), min(1.0, interval.high), interval.n, interval.stderr)


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison: the mean difference a - b, its interval, and the two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    t: float
    df: int
    n: int
    test: str = "paired t-test"


def paired_t_test(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedTest:
    """The paired t-test of a against b over matched replicates (the same seeds): with d_i = a_i - b_i,
    t = mean(d) / (s_d / sqrt(n)) on n - 1 degrees of freedom, p = 2 P(T > |t|), and the interval
    mean(d) ± t_{(1+level)/2, n-1} s_d / sqrt(n).

    Pairing by seed removes what the seed does to both methods alike (the data it drew, the
    initialisation) from the comparison. Example: a = (0.50, 0.55, 0.60), b = (0.45, 0.47, 0.49):
    d = (0.05, 0.08, 0.11), mean 0.08, s_d = 0.03, stderr 0.017321, t = 4.618802 on 2 df,
    p = 1 - t / sqrt(2 + t^2) = 0.043817, interval 0.08 ± 0.074524. With s_d = 0 the p-value is 0
    for a non-zero difference and 1 for none; fewer than 2 pairs give nan.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean, stderr = mean_stderr(d)
    if n < 2:
        return PairedTest(mean, NAN, NAN, NAN, NAN, max(n - 1, 0), n)
    if stderr == 0:
        t = math.copysign(math.inf, mean) if mean != 0 else 0.0
        return PairedTest(mean, mean, mean, 0.0 if mean != 0 else 1.0, t, n - 1, n)
    t = mean / stderr
    p = min(1.0, 2.0 * (1.0 - student_t_cdf(abs(t), n - 1)))
    half = student_t_quantile((1 + level) / 2, n - 1) * stderr
    return PairedTest(mean, mean - half, mean + half, p, t, n - 1, n)


def seeds_for_half_width(half_width: float, n: int, target: float, level: float = 0.95) -> int:
    """The fewest seeds m whose t-interval, t_{(1+level)/2, m-1} s / sqrt(m), is at most ``target`` on either
    side, where s = half_width sqrt(n) / t_{(1+level)/2, n-1} is the per-seed standard deviation behind a
    half-width ``half_width`` measured with n seeds (a planning figure: it takes the measured spread as the
    truth). Example: half-width 0.3 with 3 seeds, target 0.1: s = 0.3 sqrt(3) / 4.303 = 0.1208; m = 8 gives
    2.365 x 0.1208 / sqrt(8) = 0.101 > 0.1, m = 9 gives 2.306 x 0.1208 / 3 = 0.0928: 9 seeds."""
    if n < 2 or not half_width > 0 or not target > 0:
        raise ValueError(f"need n >= 2 seeds and positive widths, got n={n}, half_width={half_width}, target={target}")
    q = (1 + level) / 2
    s = half_width * math.sqrt(n) / student_t_quantile(q, n - 1)
    m = 2
    while student_t_quantile(q, m - 1) * s / math.sqrt(m) > target:
        m += 1
    return m


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of m p-values (Holm 1979): the i-th smallest p (i = 1..m) times
    m - i + 1, made non-decreasing in that order, capped at 1. Rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha. Example: (0.01, 0.04, 0.03) -> 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    0.04 x 1 = 0.04 raised to 0.06: (0.03, 0.06, 0.06)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(difference: float, high: float, p_adjusted: float, margin: float, alpha: float = 0.05) -> str:
    """A comparison's decision, first - second: ``better`` (``worse``) where the adjusted p < alpha and the
    difference is positive (negative); ``no better`` where the whole interval lies below +margin (a claim of
    superiority by at least the margin is refuted); ``inconclusive`` otherwise. Only ``better`` or ``worse`` is a
    significant difference; ``inconclusive`` says the data could not tell, not that the two are equal."""
    if p_adjusted < alpha:
        return "better" if difference > 0 else "worse"
    if high < margin:
        return "no better"
    return "inconclusive"


def interpolate(xs: Sequence[float], ys: Sequence[float], at: float) -> float | None:
    """y at x = ``at`` on the piecewise-linear curve through the points (xs, ys) sorted by x; None when
    ``at`` lies outside [min x, max x] (never extrapolated). Points that share an x are averaged.
    Example: points (1, 0.2), (3, 0.6): at 2 -> 0.4, at 3 -> 0.6, at 3.5 -> None."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    merged: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        merged.setdefault(float(x), []).append(float(y))
    points = sorted((x, sum(v) / len(v)) for x, v in merged.items())
    if not points or not points[0][0] <= at <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            return y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return points[0][1]  # a single point, at its own x


def bootstrap_mean_band(curves: Sequence[Sequence[float]], n_resamples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[list[float], list[float]]:
    """A percentile bootstrap band for the mean of ``curves`` (one per replicate, each evaluated on the
    same grid): resample the replicates with replacement ``n_resamples`` times, average each resample
    point by point, and take the (1 - level)/2 and (1 + level)/2 quantiles at each grid point
    (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", Ch. 13). Seeded, so it reproduces.
    With R replicates there are at most C(2R - 1, R) distinct resamples (10 for R = 3): the band is
    coarse for few seeds. Returns (low, high) lists as long as the grid; no curve: empty lists.
    """
    if not curves:
        return [], []
    width = len(curves[0])
    if any(len(c) != width for c in curves):
        raise ValueError("every curve must be evaluated on the same grid")
    rng = random.Random(seed)
    r = len(curves)
    means = []
    for _ in range(n_resamples):
        picks = [curves[rng.randrange(r)] for _ in range(r)]
        means.append([sum(c[k] for c in picks) / r for k in range(width)])
    low_index = int(math.floor((1 - level) / 2 * (n_resamples - 1)))
    high_index = int(math.ceil((1 + level) / 2 * (n_resamples - 1)))
    low, high = [], []
    for k in range(width):
        column = sorted(m[k] for m in means)
        low.append(column[low_index])
        high.append(column[high_index])
    return low, high
