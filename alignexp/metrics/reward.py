"""Reward-side numbers that need no model: best-of-N's KL, best-of-N selection, response lengths."""

from __future__ import annotations

import math
from collections.abc import Sequence

from alignexp.metrics.overlap import plain_text
from alignexp.metrics.stats import mean_stderr, summary
from alignexp.tasks.base import Text


def best_of_n_kl(n: int) -> float:
    """KL(pi_bon || pi_ref) = log N - (N - 1) / N for best-of-N sampling from pi_ref.

    The analytic value (Stiennon et al. 2020; Gao et al. 2023, "Scaling laws for reward model
    overoptimization", sec. 2) used to place best-of-N on a reward/KL frontier; Beirami et al. 2024
    ("Theoretical guarantees on the best-of-n alignment policy") show it is an upper bound. N = 1 gives 0; N = 4 gives log 4 - 3/4 = 0.6363.
    """
    if n < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_indices(scores: Sequence[Sequence[float]], n: int) -> list[int]:
    """For each prompt, the index of the best-scored of its first ``n`` samples (first on ties)."""
    out = []
    for row in scores:
        if len(row) < n:
            raise ValueError(f"best-of-{n} needs {n} samples per prompt, got {len(row)}")
        out.append(max(range(n), key=lambda i: (row[i], -i)))
    return out


def length_stats(texts: Sequence[Text], token_counts: Sequence[int] | None = None,
                 finished: Sequence[bool] | None = None) -> dict[str, float]:
    """Length statistics of outputs: mean ± stderr of words and characters (and of tokens where given:
    the generated tokens, EOS included where it was reached), the median and max tokens (or words), and
    the fraction cut by the token cap (``finished`` False: no EOS)."""
    plain = [plain_text(t) for t in texts]
    words = [len(t.split()) for t in plain]
    out = {**summary("response_words", words), **summary("response_chars", [len(t) for t in plain])}
    counts = list(token_counts) if token_counts is not None else words
    if token_counts is not None:
        out.update(summary("response_tokens", counts))
    unit = "tokens" if token_counts is not None else "words"
    if counts:
        ordered = sorted(counts)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        out[f"response_{unit}_median"] = float(median)
        out[f"response_{unit}_max"] = float(ordered[-1])
    if finished is not None:
        out["truncated_fraction"] = mean_stderr([0.0 if f else 1.0 for f in finished])[0]
    return out
