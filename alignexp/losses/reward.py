"""Reward-model loss: Bradley-Terry on pairs, Plackett-Luce on rankings (the ``reward`` loss).

This loss trains a **reward model**, not a policy: the module
(:class:`alignexp.lightning_modules.reward.RewardModule`) passes the reward model's scores r(x, y) (B, n) in the
``policy_logps`` slot of the loss contract, and the ranking's own scores, where it has them, in
``rewards`` (for their ties). It needs no reference and reads the whole ranking (``listwise=True``);
with n = 2 it is the Bradley-Terry loss.
"""

from __future__ import annotations

from torch import Tensor

from alignexp.losses.common import batch_mean, clean, list_reward_metrics, ranking_nll
from alignexp.losses.registry import LossOutput, default_mask, register_loss


@register_loss("reward", needs_reference=False, listwise=True, uses_scores=True, stage="reward_model")
def reward_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                rewards: Tensor | None = None, mask: Tensor | None = None, *,
                margin: float = 0.0) -> LossOutput:
    """Negative log-likelihood of the ranking under a Plackett-Luce model of the rewards.

    With r_k the reward of the k-th best response (k = 0 .. m-1, m the row's existing responses) and
    ``margin`` the margin m0 >= 0 the best of each position must win by:

        L = -sum_{k=0}^{m-2} [ (r_k - m0) - log( exp(r_k - m0) + sum_{j>k} exp(r_j) ) ]

    the Plackett-Luce likelihood (DPO paper, Rafailov et al. 2023, Appendix A.3, Eq. 18, with the
    reward model in place of the implicit reward). For m = 2 it is the Bradley-Terry loss
    -log sigmoid(r(x, y_w) - r(x, y_l) - m0) (DPO paper Eq. 2; the proposal's Eq. 7), with m0 the
    margin of Llama 2's reward model (Touvron et al. 2023, Eq. 2). Masked slots are left out of every
    sum; rows with nothing to compare are left out of the batch mean. Tied labels (equal ``rewards``)
    are never compared: the sum over j runs over the responses strictly worse than y_k
    (:func:`alignexp.losses.common.plackett_luce_nll`).

    Worked example (m0 = 0): r = (2, 0) gives log(1 + e^-2) = 0.1269; r = (1, 0, -1) gives
    [log(1 + e^-1 + e^-2) + log(1 + e^-1)] = 0.40761 + 0.31326 = 0.72087; with the labels (5, 5, 0)
    (a tie at the top) the same r gives log(1 + e^-2) + log(1 + e^-1) = 0.12693 + 0.31326 = 0.44019.

    Args:
        policy_logps: (B, n) reward-model scores, best first (the slot carries rewards, not log-probs).
        rewards: optional (B, n) label scores of the ranking (their ties). mask: (B, n) bool, True where
            a response exists. ``ref_logps``, ``lengths``: unused.
    Returns:
        ``loss`` (batch mean); metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` and
        ``rewards/accuracy`` (share of the ranking's ordered pairs the rewards order correctly).
    """
    mask = default_mask(policy_logps, mask)
    r = clean(policy_logps, mask)
    losses, better, rows = ranking_nll(r, mask, rewards, margin)
    return LossOutput(batch_mean(losses, rows), list_reward_metrics(r, mask, better, prefix="rewards"))
