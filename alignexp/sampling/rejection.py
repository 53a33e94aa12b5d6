"""Statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
Optimization" (RSO), Algorithm 1).

From M candidates y_i ~ pi_sft(y | x) with rewards r_i, it draws samples approximately from the optimal
policy of the KL-constrained reward maximisation, pi_r(y | x) ∝ pi_sft(y | x) exp(r(x, y) / beta):
in each sweep over the candidates not yet accepted, with r_max the best reward among them
(recomputed at the start of every sweep), candidate i is accepted with probability

    exp((r_i - r_max) / beta)

(so the best remaining candidate is always accepted), until ``num_samples`` are accepted. A small
beta keeps only the best candidates; beta -> infinity accepts uniformly (the SFT distribution).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class RejectionResult:
    """``accepted``: candidate indices in the order they were accepted; ``sweeps``: the sweep (1, 2, ...)
    that accepted each."""

    accepted: list[int]
    sweeps: list[int]


def rejection_sample(rewards: Sequence[float], num_samples: int, beta: float,
                     rng: random.Random) -> RejectionResult:
    """RSO Algorithm 1 on one prompt's candidate ``rewards`` (see the module docstring).

    Candidates are visited in their given order within a sweep, one uniform draw each, and a sweep
    stops as soon as ``num_samples`` are accepted, as in the paper's code. Raises ValueError naming
    ``sampler.num_samples`` / ``sampler.beta`` for impossible settings.
    """
    if beta <= 0:
        raise ValueError(f"sampler.beta must be > 0, got {beta}")
    if not 1 <= num_samples <= len(rewards):
        raise ValueError(f"sampler.num_samples must be in [1, num_candidates = {len(rewards)}], got {num_samples}")
    if any(math.isnan(r) for r in rewards):
        raise ValueError("rejection sampling needs a reward for every candidate (got NaN)")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    sweeps: list[int] = []
    sweep = 0
    while len(accepted) < num_samples:
        sweep += 1
        r_max = max(rewards[i] for i in remaining)
        taken = set()
        for i in remaining:
            if rng.random() < math.exp((rewards[i] - r_max) / beta):
                accepted.append(i)
                sweeps.append(sweep)
                taken.add(i)
                if len(accepted) == num_samples:
                    break
        remaining = [i for i in remaining if i not in taken]
    return RejectionResult(accepted, sweeps)
