"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward") and ranked
SimPO (ours): SimPO's length-normalised, reference-free reward in a Plackett-Luce likelihood of a ranking."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import (
    batch_mean,
    list_reward_metrics,
    pair_mask,
    pair_reward_metrics,
    ranking_nll,
    token_mean_logps,
)
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("simpo", needs_reference=False)
def simpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
               rewards: Tensor | None = None, mask: Tensor | None = None, *,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO on the pair (column 0 chosen, column 1 rejected); no reference model.

    With the reward u_k = beta * lp(y_k) / |y_k| (the average log-prob per token, scaled), the target
    reward margin gamma and eps = ``label_smoothing``, z = u_0 - u_1 - gamma:

        L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)               (Meng et al. 2024, Eq. 6)

    TRL: CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0`` (its ``simpo_gamma`` is gamma); the same
    defaults (beta 2.0, gamma 0.5).

    Args:
        policy_logps: (B, n >= 2) summed response log-probs; columns 0 and 1 are used.
        lengths: (B, n) response tokens (required). mask: (B, n) bool; rows without both slots are left out.
    Returns:
        ``loss``; metrics ``rewards/*`` on u (chosen, rejected, margin, accuracy).
    """
    lengths = require(lengths, "response lengths", "simpo")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    u = beta * token_mean_logps(policy_logps[:, :2], lengths[:, :2], mask[:, :2])
    z = u[:, 0] - u[:, 1] - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return LossOutput(batch_mean(losses, rows), pair_reward_metrics(u[:, 0], u[:, 1], rows))


@register_loss("ranked_simpo", needs_reference=False, listwise=True, uses_scores=True)
def ranked_simpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                      rewards: Tensor | None = None, mask: Tensor | None = None, *,
                      beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """Ranked SimPO (ours): the Plackett-Luce likelihood of the whole ranking under SimPO's reward
    u_k = beta * lp(y_k) / |y_k|, the winner of each factor handicapped by the target margin gamma:

        L = -sum_{k=1}^{m-1} log( e^{u_k - gamma} / (e^{u_k - gamma} + sum_{j>k} e^{u_j}) )
          =  sum_k -log sigmoid(u_k - gamma - logsumexp_{j>k} u_j)

    (1-indexed, best first, m the row's list length). With m = 2 it is SimPO (Meng et al. 2024, Eq. 6):
    -log sigmoid(u_1 - u_2 - gamma). It is to SimPO what ranked DPO is to DPO; ties are treated as ranked
    DPO treats them: equal ``rewards`` are never compared, each factor runs over the responses strictly
    worse than y_k (:func:`alignexp.losses.common.plackett_luce_nll`). No framework has it, so it has no
    TRL counterpart; its n = 2 case is checked against TRL's SimPO.

    Args:
        policy_logps: (B, n) summed log-probs, best first. lengths: (B, n) response tokens (required).
        rewards: optional (B, n) scores (their ties). mask: (B, n) bool.
    Returns:
        ``loss``; metrics ``rewards/*`` on u (best vs the mean of the others, and pairwise accuracy).
    """
    lengths = require(lengths, "response lengths", "ranked_simpo")
    mask = default_mask(policy_logps, mask)
    u = beta * token_mean_logps(policy_logps, lengths, mask)
    rank, better, rows = ranking_nll(u, mask, rewards, margin=gamma)
    return LossOutput(batch_mean(rank, rows), list_reward_metrics(u, mask, better))
