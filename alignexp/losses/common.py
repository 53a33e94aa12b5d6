"""Tensor helpers shared by the losses: masking, batch means, implicit-reward metrics.

Conventions (see :mod:`alignexp.losses.registry`): tensors are (B, n), column 0 the best response,
``mask`` True where a response exists. Masked slots may hold anything (0, garbage, NaN rewards);
the losses replace them with neutral values (:func:`clean`, :func:`clean_lengths`) *before* any
arithmetic, so that neither the loss nor its gradient ever sees them (``0 * nan`` is ``nan`` in a
backward pass, so zeroing a term after computing it is not enough).
"""

from __future__ import annotations

import torch
from torch import Tensor


def clean(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """``values`` with masked slots replaced by ``fill`` (NaN and garbage never reach the maths)."""
    return torch.where(mask, values, torch.full_like(values, fill))


def clean_lengths(lengths: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Response lengths as ``dtype``, masked slots (length 0) set to 1 so that dividing by them is safe."""
    lengths = lengths.to(dtype)
    return torch.where(mask, lengths.clamp(min=1), torch.ones_like(lengths))


def pair_mask(mask: Tensor) -> Tensor:
    """(B,) True where the first two slots both exist, i.e. the row holds a (chosen, rejected) pair."""
    if mask.shape[1] < 2:
        return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    return mask[:, 0] & mask[:, 1]


def list_rows(mask: Tensor) -> Tensor:
    """(B,) True where the row holds at least two responses (something to rank)."""
    return mask.sum(dim=1) >= 2


def batch_mean(per_example: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``per_example`` (B,) over the rows where ``rows`` is True.

    Rows without a pair or a list to rank are left out of the mean rather than counted as zero; when
    no row counts, the result is a 0 that keeps the graph (so ``backward`` still works).
    """
    values = torch.where(rows, per_example, torch.zeros_like(per_example))
    return values.sum() / rows.sum().clamp(min=1).to(values.dtype)


def later_mask(mask: Tensor) -> Tensor:
    """(B, n, n) bool, ``[b, k, j]`` True where slots k and j both exist and j comes after k (j > k)."""
    n = mask.shape[1]
    after = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(diagonal=1)
    return after[None] & mask[:, :, None] & mask[:, None, :]


def position_labels(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Ranking positions as labels when no scores are given: the number of existing responses after
    each slot, i.e. ``m - 1 - k`` for a list of m responses (best gets m - 1, worst 0). (B, n) ``dtype``."""
    return later_mask(mask).sum(dim=2).to(dtype)


def pairwise_accuracy(scores: Tensor, better: Tensor, rows: Tensor) -> Tensor:
    """Share of the pairs (i better than j, ``better`` (B, n, n)) whose ``scores`` are ordered the same
    way (strictly), averaged within each row and then over the rows that have a pair."""
    scores = scores.detach()
    correct = (scores[:, :, None] > scores[:, None, :]) & better
    n_pairs = better.sum(dim=(1, 2))
    per_row = correct.sum(dim=(1, 2)).to(scores.dtype) / n_pairs.clamp(min=1).to(scores.dtype)
    return batch_mean(per_row, rows & (n_pairs > 0))


def pair_reward_metrics(chosen: Tensor, rejected: Tensor, rows: Tensor,
                        prefix: str = "rewards") -> dict[str, Tensor]:
    """Means over ``rows`` of ``chosen``, ``rejected`` (B,), their margin, and how often chosen > rejected."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        f"{prefix}/chosen": batch_mean(chosen, rows),
        f"{prefix}/rejected": batch_mean(rejected, rows),
        f"{prefix}/margin": batch_mean(chosen - rejected, rows),
        f"{prefix}/accuracy": batch_mean((chosen > rejected).to(chosen.dtype), rows),
    }


def list_reward_metrics(values: Tensor, mask: Tensor, better: Tensor,
                        prefix: str = "rewards") -> dict[str, Tensor]:
    """Metrics of per-response ``values`` (B, n) (implicit rewards, or normalised log-probs) on lists.

    ``{prefix}/chosen``: the best response's value; ``{prefix}/rejected``: the mean over the other
    responses of the row; ``{prefix}/margin``: their difference; ``{prefix}/accuracy``: the share of
    ordered pairs (``better``) that ``values`` order correctly. With n = 2 these equal DPO's metrics.
    """
    values = clean(values.detach(), mask)
    rows = list_rows(mask)
    others = mask.clone()
    others[:, 0] = False
    rejected = values.masked_fill(~others, 0).sum(dim=1) / others.sum(dim=1).clamp(min=1).to(values.dtype)
    chosen = values[:, 0]
    return {
        f"{prefix}/chosen": batch_mean(chosen, rows),
        f"{prefix}/rejected": batch_mean(rejected, rows),
        f"{prefix}/margin": batch_mean(chosen - rejected, rows),
        f"{prefix}/accuracy": pairwise_accuracy(values, better, rows),
    }
