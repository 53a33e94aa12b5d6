"""DPO and conservative DPO (Rafailov et al. 2023, Eq. 7; Mitchell 2023 for label smoothing)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import batch_mean, clean, pair_mask, pair_reward_metrics
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


def pair_logratios(policy_logps: Tensor, ref_logps: Tensor,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-ratios log pi/pi_ref of the first two columns, each (B,).

    With ``mask``, slots that do not exist hold 0 (so that they never carry NaN into a gradient).
    """
    logratios = policy_logps[:, :2] - ref_logps[:, :2]
    if mask is not None:
        logratios = clean(logratios, mask[:, :2])
    return logratios[:, 0], logratios[:, 1]


@register_loss("dpo", needs_reference=True, aliases=("cdpo",))
def dpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO on the pair (column 0 chosen, column 1 rejected).

    With h = [lp(y0) - lr(y0)] - [lp(y1) - lr(y1)] and eps = ``label_smoothing``:

        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    eps = 0 is DPO (Rafailov et al. 2023, Eq. 7); eps > 0 is conservative DPO (cDPO), which
    assumes each label is flipped with probability eps.

    Args:
        policy_logps, ref_logps: (B, n >= 2) summed response log-probs; only columns 0 and 1 are used.
        mask: (B, n) bool; rows whose first two slots do not both exist are left out of the mean.
    Returns:
        ``loss`` (scalar batch mean); metrics ``rewards/chosen``, ``rewards/rejected`` (beta * log-ratio),
        ``rewards/margin`` and ``rewards/accuracy`` (batch means).
    """
    ref_logps = require(ref_logps, "reference log-probs", "dpo")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    chosen, rejected = pair_logratios(policy_logps, ref_logps, mask)
    logits = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(batch_mean(losses, rows), pair_reward_metrics(beta * chosen, beta * rejected, rows))
