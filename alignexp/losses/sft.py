"""Supervised fine-tuning on the best response (SFT, and Preferred-FT on preference data)."""

from __future__ import annotations

from torch import Tensor

from alignexp.losses.common import pooled_nll
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("sft", needs_reference=False, min_responses=1, data="demonstrations")
def sft_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None) -> LossOutput:
    """Token-mean negative log-likelihood of column 0 (the demonstration, or the best response).

        L = -sum_b lp(y0_b) / sum_b |y0_b|

    i.e. the usual per-token cross-entropy over the batch's response tokens. Preferred-FT
    (DPO paper Sec. 6) is this loss on the chosen response of preference data.
    """
    lengths = require(lengths, "response lengths", "sft")
    nll = pooled_nll(policy_logps[:, 0], lengths[:, 0], default_mask(policy_logps, mask)[:, 0])
    return LossOutput(nll, {"nll": nll.detach()})


# Preferred-FT: the same loss on the best response of each ranking.
register_loss("preferred_ft", needs_reference=False, min_responses=1, data="best")(sft_loss)
