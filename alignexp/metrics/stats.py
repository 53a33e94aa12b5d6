"""Means with standard errors and confidence intervals: every number alignexp prints carries its uncertainty."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The sample mean and its standard error (sample std / sqrt(n); 0 for n < 2)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summary(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``{prefix: mean, prefix_stderr: stderr}`` (the eval.json convention for a metric and its stderr)."""
    mean, stderr = mean_stderr(values)
    return {prefix: mean, f"{prefix}_stderr": stderr}


def wilson_interval(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``successes / n`` (Wilson 1927, eq. for p±).

    With p = k/n: centre (p + z²/2n) / (1 + z²/n), half-width z/(1 + z²/n) * sqrt(p(1-p)/n + z²/4n²).
    ``successes`` may be fractional (ties counted as half a success), and ``n`` an effective sample
    size (see :func:`alignexp.metrics.preference.agreement`). z = 1.96: a 95% interval.
    Example: k = 8, n = 10 gives (0.490, 0.943). Returns (nan, nan) for n = 0.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence, statistic: Callable[[list], float], n_resamples: int = 200,
                       seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """A percentile bootstrap interval of ``statistic`` over ``values`` resampled with replacement.

    For corpus-level metrics (BLEU over a test set) whose standard error has no closed form:
    ``values`` are the items (e.g. (hypothesis, reference) pairs) and ``statistic`` maps a list of
    items to a number. Seeded, so the interval reproduces.
    """
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    items = list(values)
    stats = sorted(statistic([items[rng.randrange(len(items))] for _ in items]) for _ in range(n_resamples))
    low = stats[int(math.floor(alpha / 2 * (n_resamples - 1)))]
    high = stats[int(math.ceil((1 - alpha / 2) * (n_resamples - 1)))]
    return low, high


def clustered_mean_stderr(values: Sequence[float], clusters: Sequence[object]) -> tuple[float, float, int]:
    """The mean of ``values`` and its cluster-robust standard error, for values that come in clusters
    (the pairs of one ranking, the turns of one dialogue) correlated within and independent between.

    With N values, G clusters, mean p and e_g = sum over cluster g of (y_i - p):

        SE^2 = G / (G - 1) * sum_g e_g^2 / N^2

    the cluster-robust ("sandwich") variance of a mean with the usual G/(G-1) small-sample factor
    (Cameron & Miller 2015, "A Practitioner's Guide to Cluster-Robust Inference", Sec. II.C and
    eq. 12 with no regressor but the intercept). With one value per cluster it is the plain s^2 / N.
    Example: values (1, 1, 0 | 1 | 0, 0) in clusters (a, a, a, b, c, c): p = 0.5, e = (0.5, 0.5, -1),
    SE^2 = 3/2 * 1.5 / 36 = 0.0625, SE = 0.25 (the pairs taken as independent: 0.2236).
    Returns (mean, stderr, G); (nan, nan, 0) for no values, stderr 0 for one cluster.
    """
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(values) / n
    residuals: dict[object, float] = {}
    for value, cluster in zip(values, clusters):
        residuals[cluster] = residuals.get(cluster, 0.0) + value - mean
    g = len(residuals)
    if g < 2:
        return mean, 0.0, g
    variance = g / (g - 1) * sum(e * e for e in residuals.values()) / (n * n)
    return mean, math.sqrt(variance), g


def clustered_summary(prefix: str, values: Sequence[float], clusters: Sequence[object]) -> dict[str, float]:
    """``{prefix: mean, prefix_stderr: cluster-robust stderr}`` (:func:`clustered_mean_stderr`)."""
    mean, stderr, _ = clustered_mean_stderr(values, clusters)
    return {prefix: mean, f"{prefix}_stderr": stderr}


def clustered_interval(values: Sequence[float], clusters: Sequence[object],
                       level: float = 0.95) -> tuple[float, float, float, float, int]:
    """(mean, cluster-robust stderr, low, high, clusters): the interval mean ± t_{(1+level)/2, G-1} SE, with
    the G - 1 degrees of freedom that Cameron & Miller (2015, Sec. VI.B) recommend for G clusters."""
    mean, stderr, g = clustered_mean_stderr(values, clusters)
    if g < 2:
        return mean, stderr, float("nan"), float("nan"), g
    half = student_t_quantile((1 + level) / 2, g - 1) * stderr
    return mean, stderr, mean - half, mean + half, g


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz;
    Press et al., "Numerical Recipes", 3rd ed., Sec. 6.4, eqs. 6.4.5-6.4.6), accurate to ~1e-14."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom: with x = df / (df + t^2), the two tails
    hold I_x(df/2, 1/2). Checks: df = 1 is the Cauchy law, 1/2 + atan(t)/pi; df = 2 has the closed
    form 1/2 + t / (2 sqrt(2 + t^2))."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tails = regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tails / 2.0 if t > 0 else tails / 2.0


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on :func:`student_t_cdf` to ~1e-12). Checks (p = 0.975):
    df = 1: tan(0.475 pi) = 12.706205; df = 2: 0.95 sqrt(2 / (1 - 0.95^2)) = 4.302653; df = 4: 2.776445."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0
