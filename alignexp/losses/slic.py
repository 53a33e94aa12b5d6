"""SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
Sec. 2, the calibration loss with cross-entropy regularisation)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignexp.losses.common import batch_mean, clean, pair_mask, pair_reward_metrics
from alignexp.losses.registry import LossOutput, default_mask, register_loss


@register_loss("slic", needs_reference=False)
def slic_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
              rewards: Tensor | None = None, mask: Tensor | None = None, *,
              target_logps: Tensor | None = None,
              margin: float = 1.0, sft_weight: float = 0.1) -> LossOutput:
    """SLiC-HF's rank calibration loss plus its cross-entropy regulariser; no reference model.

        L = max(0, margin - lp(y0) + lp(y1)) - sft_weight * lp(y_ref)

    (the paper's delta = ``margin``, lambda = ``sft_weight``). y_ref is the example's ``target``
    response when it has one (SLiC-HF regularises towards the SFT reference summary), else the
    chosen response y0. Log-probs are summed over tokens, so the margin is in sequence nats.

    Defaults: ``margin = 1`` (a unit margin in sequence log-likelihood, as in SLiC); ``sft_weight =
    0.1`` is a starting point for our setting, not a value taken from the paper: the regulariser is
    a summed log-likelihood, so its useful weight depends on response length. Tune it.

    Args:
        policy_logps: (B, n >= 2) summed response log-probs; columns 0 (y+) and 1 (y-) are used.
        target_logps: optional (B,) summed log-probs of each example's target response; when None,
            ``policy_logps[:, 0]`` is used.
        mask: (B, n) bool; rows without both slots are left out of the mean.
    Returns:
        ``loss``; metrics ``loss/rank`` (hinge part), ``loss/sft`` (the weighted regulariser) and
        ``logps/*`` (policy log-probs of chosen and rejected, their margin and ordering accuracy).
    """
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    logps = clean(policy_logps[:, :2], mask[:, :2])
    chosen, rejected = logps[:, 0], logps[:, 1]
    target = chosen if target_logps is None else torch.where(rows, target_logps, torch.zeros_like(chosen))
    rank = torch.relu(margin - chosen + rejected)
    sft = -sft_weight * target
    metrics = {"loss/rank": batch_mean(rank.detach(), rows), "loss/sft": batch_mean(sft.detach(), rows)}
    metrics.update(pair_reward_metrics(chosen, rejected, rows, prefix="logps"))
    return LossOutput(batch_mean(rank + sft, rows), metrics)
