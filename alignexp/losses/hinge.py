"""RSO's hinge-norm loss (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
Optimization", Sec. 3, the "hinge-norm" loss of its unified preference-modelling view)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignexp.losses.common import batch_mean, pair_mask, pair_reward_metrics
from alignexp.losses.dpo import pair_logratios
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("hinge", needs_reference=True)
def hinge_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
               rewards: Tensor | None = None, mask: Tensor | None = None, *,
               beta: float = 0.1) -> LossOutput:
    """Hinge loss on the normalised likelihood margin (column 0 chosen, column 1 rejected).

    With h = [lp(y0) - lr(y0)] - [lp(y1) - lr(y1)] (``beta`` is the paper's gamma):

        L = max(0, 1 - beta h)

    i.e. SLiC's hinge applied to DPO's reference-normalised log-ratios (RSO's "hinge-norm"): the
    pair stops contributing once beta h >= 1, so 1/beta is the margin in log-ratio units.

    Args:
        policy_logps, ref_logps: (B, n >= 2) summed response log-probs; columns 0 and 1 are used.
        mask: (B, n) bool; rows without both slots are left out of the mean.
    Returns:
        ``loss``; metrics ``rewards/*`` (beta * log-ratio, as DPO).
    """
    ref_logps = require(ref_logps, "reference log-probs", "hinge")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    chosen, rejected = pair_logratios(policy_logps, ref_logps, mask)
    losses = torch.relu(1 - beta * (chosen - rejected))
    return LossOutput(batch_mean(losses, rows), pair_reward_metrics(beta * chosen, beta * rejected, rows))
