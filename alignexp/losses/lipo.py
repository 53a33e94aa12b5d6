"""LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank",
Sec. 4, Eq. 8: the LambdaLoss objective on DPO's implicit rewards)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import (
    batch_mean,
    clean,
    comparable_rows,
    list_reward_metrics,
    ordered_pairs,
    position_labels,
)
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


def predicted_ranks(scores: Tensor, mask: Tensor) -> Tensor:
    """1-based rank of each slot among the row's existing slots when sorted by ``scores``, highest
    first; ties go to the earlier column. (B, n) in ``scores``' dtype (masked slots: n + 1)."""
    scores = scores.detach()
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores[:, None, :] > scores[:, :, None]) | (
        (scores[:, None, :] == scores[:, :, None]) & (index[None, :] < index[:, None])[None])
    ranks = 1 + (ahead & mask[:, None, :]).sum(dim=2)
    return torch.where(mask, ranks, torch.full_like(ranks, scores.shape[1] + 1)).to(scores.dtype)


def list_normalised(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` mapped per row to [0, 1] over the row's existing slots: (v - min) / (max - min); a row
    whose values are all equal (or that has a single response) maps to 0. Masked slots: 0. (B, n).

    Example: scores (3.0, 2.5, -1.0) give (1, 0.875, 0); positions (3, 2, 1, 0) give (1, 2/3, 1/3, 0)."""
    low = values.masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True)
    high = values.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
    spread = torch.where(high > low, high - low, torch.ones_like(high))
    return torch.where(mask & (high > low), (values - low) / spread, torch.zeros_like(values))


def lambda_weights(labels: Tensor, ranks: Tensor) -> Tensor:
    """DCG Lambda weights (B, n, n): |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1,
    D(tau) = log2(1 + tau)."""
    gains = torch.pow(2.0, labels) - 1
    inv_discounts = 1 / torch.log2(1 + ranks)
    return (gains[:, :, None] - gains[:, None, :]).abs() * (inv_discounts[:, :, None] - inv_discounts[:, None, :]).abs()


@register_loss("lipo", needs_reference=True, listwise=True, uses_scores=True)
def lipo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
              rewards: Tensor | None = None, mask: Tensor | None = None, *,
              beta: float = 0.1) -> LossOutput:
    """LiPO-lambda: a Lambda-weighted pairwise logistic loss over every ordered pair of the list.

    With s_i = beta * (lp(y_i) - lr(y_i)) and labels psi_i:

        L = sum_{psi_i > psi_j} Delta_ij * log(1 + exp(-(s_i - s_j)))                  (Eq. 8)
        Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G_i = 2^{psi_i} - 1,  D(tau) = log2(1 + tau)

    tau_i is the rank of y_i when the list is sorted by the current s (1 = highest), so the weight
    is the change in DCG from swapping i and j; it is a constant (no gradient flows through the
    ranks or gains). The paper writes D(tau) = log(1 + tau), the LambdaLoss/DCG discount, which is
    base 2 by convention; another base only rescales the loss (by ln 2 for the natural log).

    Labels: the paper's psi lie in [0, 1] (the LiPO paper's labels are scores in that range), so the
    raw labels -- the ``rewards`` when given, else the ranking positions m - 1 - k -- are mapped per
    list to [0, 1] by :func:`list_normalised`: psi = (v - min) / (max - min) over the list. The gains
    G = 2^psi - 1 then lie in [0, 1] whatever the scale of the scores (rewards in [-1, 1], ratings
    1..10, a reward model's logits), so the loss and its gradients do not shrink or grow with it,
    and a list's best response always has G = 1 and its worst G = 0. Tied labels make no pair
    (:func:`alignexp.losses.common.ordered_pairs`; they have |G_i - G_j| = 0 anyway), and a list of tied
    responses only is left out of the batch mean.

    Args:
        policy_logps, ref_logps: (B, n) summed log-probs, best first. rewards: optional (B, n)
            (NaN allowed in masked slots). mask: (B, n) bool.
    Returns:
        ``loss``; metrics ``rewards/*`` on s (best vs the mean of the others, and the share of
        label-ordered pairs that s orders correctly).
    """
    ref_logps = require(ref_logps, "reference log-probs", "lipo")
    mask = default_mask(policy_logps, mask)
    s = beta * (clean(policy_logps, mask) - clean(ref_logps, mask))
    raw = position_labels(mask, s.dtype) if rewards is None else clean(rewards.to(s.dtype), mask)
    labels = list_normalised(raw, mask)
    better = ordered_pairs(mask, rewards)  # [b, i, j]: psi_i > psi_j
    weights = lambda_weights(labels, predicted_ranks(s, mask))
    weights = torch.where(better, weights, torch.zeros_like(weights))  # also keeps inf/NaN of unused pairs out
    pair_losses = F.softplus(-(s[:, :, None] - s[:, None, :]))
    per_row = (weights * pair_losses).sum(dim=(1, 2))
    return LossOutput(batch_mean(per_row, comparable_rows(better)), list_reward_metrics(s, mask, better))
