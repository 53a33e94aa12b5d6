"""Ranked DPO (our method): the Plackett-Luce likelihood of a ranking under DPO's implicit reward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import batch_mean, clean, later_mask, list_reward_metrics, list_rows
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


def plackett_luce_nll(u: Tensor, mask: Tensor) -> Tensor:
    """Per-row negative log-likelihood (B,) of the order given by the columns, under Plackett-Luce
    with utilities ``u`` (B, n): sum over k of -log( e^{u_k} / sum_{j >= k} e^{u_j} ), masked slots
    left out of every sum.

    Each factor is computed as -log sigmoid(u_k - logsumexp_{j > k} u_j), which is the same number,
    is stable for any u, and makes the n = 2 case literally DPO's -log sigmoid(u_0 - u_1).
    """
    later = later_mask(mask)  # [b, k, j]: j after k, both exist
    rest = torch.logsumexp(u[:, None, :].masked_fill(~later, torch.finfo(u.dtype).min), dim=2)
    has_later = later.any(dim=2)
    terms = -F.logsigmoid(u - rest)
    return torch.where(has_later, terms, torch.zeros_like(terms)).sum(dim=1)


@register_loss("ranked_dpo", needs_reference=True, listwise=True)
def ranked_dpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                    rewards: Tensor | None = None, mask: Tensor | None = None, *,
                    beta: float = 0.1, sft_weight: float = 0.0) -> LossOutput:
    """Ranked DPO: maximise the Plackett-Luce likelihood of the whole ranking under DPO's implicit
    reward u_k = beta * (lp(y_k) - lr(y_k)).

        L = -sum_{k=1}^{m-1} [ u_k - log sum_{j=k}^{m} exp(u_j) ]  +  sft_weight * (-lp(y_1))

    (1-indexed, best first, m the row's list length). This corrects the proposal's Eq. 20, which
    writes y_1 in the numerator of every factor: the k-th factor is the probability that y_k is
    chosen first among y_k, ..., y_m, i.e. it compares y_k with the responses after it. With m = 2
    it is exactly DPO (Rafailov et al. 2023, Eq. 7); the DPO paper's Appendix A.3 derives the same
    Plackett-Luce objective. Ties are ranked in the order given (the task's stable sort).

    Args:
        policy_logps, ref_logps: (B, n) summed log-probs, best first. mask: (B, n) bool; slots that
            do not exist are left out of every logsumexp and of the sum.
    Returns:
        ``loss``; metrics ``loss/rank``, ``loss/sft``, and ``rewards/*`` on u (best vs the mean of
        the others, and the share of ordered pairs that u orders correctly).
    """
    ref_logps = require(ref_logps, "reference log-probs", "ranked_dpo")
    mask = default_mask(policy_logps, mask)
    logps = clean(policy_logps, mask)
    u = beta * (logps - clean(ref_logps, mask))
    rank = plackett_luce_nll(u, mask)
    sft = sft_weight * -logps[:, 0]
    rows = list_rows(mask)
    metrics = {"loss/rank": batch_mean(rank.detach(), rows), "loss/sft": batch_mean(sft.detach(), rows)}
    metrics.update(list_reward_metrics(u, mask, later_mask(mask)))
    return LossOutput(batch_mean(rank + sft, rows), metrics)
