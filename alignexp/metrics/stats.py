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


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``successes / n`` (Wilson 1927, eq. for p±).

    With p = k/n: centre (p + z²/2n) / (1 + z²/n), half-width z/(1 + z²/n) * sqrt(p(1-p)/n + z²/4n²).
    ``successes`` may be fractional (ties counted as half a success). z = 1.96: a 95% interval.
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
