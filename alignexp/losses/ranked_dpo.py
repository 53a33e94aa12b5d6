"""Ranked DPO (our method): the Plackett-Luce likelihood of a ranking under DPO's implicit reward."""

from __future__ import annotations

from torch import Tensor

from alignexp.losses.common import batch_mean, clean, list_reward_metrics, ranking_nll
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("ranked_dpo", needs_reference=True, listwise=True, uses_scores=True)
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
    Plackett-Luce objective. Ties (equal ``rewards``) are never compared: each factor runs over the
    responses strictly worse than y_k (:func:`alignexp.losses.common.plackett_luce_nll`); the scores
    are read for that only, and a ranking without scores has no ties.

    Args:
        policy_logps, ref_logps: (B, n) summed log-probs, best first. rewards: optional (B, n) scores
            (their ties). mask: (B, n) bool; slots that do not exist are left out of every logsumexp and
            of the sum; rows with nothing to compare are left out of the mean.
    Returns:
        ``loss``; metrics ``loss/rank``, ``loss/sft``, and ``rewards/*`` on u (best vs the mean of
        the others, and the share of ordered pairs that u orders correctly).
    """
    ref_logps = require(ref_logps, "reference log-probs", "ranked_dpo")
    mask = default_mask(policy_logps, mask)
    logps = clean(policy_logps, mask)
    u = beta * (logps - clean(ref_logps, mask))
    rank, better, rows = ranking_nll(u, mask, rewards)
    sft = sft_weight * -logps[:, 0]
    metrics = {"loss/rank": batch_mean(rank.detach(), rows), "loss/sft": batch_mean(sft.detach(), rows)}
    metrics.update(list_reward_metrics(u, mask, better))
    return LossOutput(batch_mean(rank + sft, rows), metrics)
