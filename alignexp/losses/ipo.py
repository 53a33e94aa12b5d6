"""IPO: identity preference optimisation (Azar et al. 2023, "A General Theoretical Paradigm to
Understand Learning from Human Preferences", Eq. 17)."""

from __future__ import annotations

from torch import Tensor

from alignexp.losses.common import batch_mean, clean_lengths, pair_mask, pair_reward_metrics
from alignexp.losses.dpo import pair_logratios
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("ipo", needs_reference=True)
def ipo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, length_normalize: bool = False) -> LossOutput:
    """IPO on the pair (column 0 chosen, column 1 rejected).

    With h = [lp(y0) - lr(y0)] - [lp(y1) - lr(y1)] (``beta`` is the paper's tau):

        L = (h - 1 / (2 beta))^2                                   (Azar et al. 2023, Eq. 17)

    IPO regresses the log-ratio margin onto the fixed target 1/(2 beta) instead of pushing it to
    infinity as DPO's logistic loss does, which is what keeps it regularised when preferences are
    deterministic.

    ``length_normalize``: divide each log-ratio by its own response length first,
    h = [lp(y0) - lr(y0)] / |y0| - [lp(y1) - lr(y1)] / |y1|, which is TRL's convention
    (``loss_type="ipo"`` averages the log-probs over tokens). Default **False**: Eq. 17 is stated
    on sequence log-likelihoods, which is the framework's contract (summed log-probs), and it keeps
    ``beta`` on the same scale as DPO's so that a beta sweep compares the two losses. With
    normalisation the target 1/(2 beta) becomes a per-token margin, and beta values are not
    comparable between the two settings.

    Args:
        policy_logps, ref_logps: (B, n >= 2) summed response log-probs; columns 0 and 1 are used.
        lengths: (B, n) response tokens; needed only with ``length_normalize``.
        mask: (B, n) bool; rows without both slots are left out of the mean.
    Returns:
        ``loss``; metrics ``rewards/*`` (beta * log-ratio, as DPO) and ``logits/margin`` (mean h).
    """
    ref_logps = require(ref_logps, "reference log-probs", "ipo")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    chosen, rejected = pair_logratios(policy_logps, ref_logps, mask)
    if length_normalize:
        lengths = clean_lengths(require(lengths, "response lengths (length_normalize=true)", "ipo")[:, :2],
                                mask[:, :2], chosen.dtype)
        chosen, rejected = chosen / lengths[:, 0], rejected / lengths[:, 1]
    h = chosen - rejected
    losses = (h - 1 / (2 * beta)) ** 2
    metrics = pair_reward_metrics(beta * chosen, beta * rejected, rows)
    metrics["logits/margin"] = batch_mean(h.detach(), rows)
    return LossOutput(batch_mean(losses, rows), metrics)
