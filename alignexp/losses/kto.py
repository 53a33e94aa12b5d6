"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") on binary feedback."""

from __future__ import annotations

import torch
from torch import Tensor

from alignexp.losses.common import batch_mean, clean
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("kto", needs_reference=True, needs_rewards=True, min_responses=1, data="binary")
def kto_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO on binary feedback: each row is one (prompt, response) judged desirable or not, with the batch's
    KL reference point.

    Layout (what the preference stage packs for a loss with ``data="binary"``): column 0 is the response
    y_b, ``rewards[:, 0]`` its label (1 desirable, 0 undesirable), column 1 the *mismatched* response
    y'_b, the response of another example of the data whose prompt differs, under this row's prompt x_b.
    With r_b = lp(y_b | x_b) - lr(y_b | x_b) and the reference point

        z0 = max(0, mean_b [ lp(y'_b | x_b) - lr(y'_b | x_b) ])      (detached: no gradient)

    an estimate of KL(pi || pi_ref) from mismatched pairs, the loss is

        L = mean_b v_b,   v_b = lambda_D (1 - sigmoid(beta (r_b - z0)))   where y_b is desirable,
                          v_b = lambda_U (1 - sigmoid(beta (z0 - r_b)))   where it is not

    (Ethayarajh et al. 2024, Eq. 7-8; lambda_D = ``desirable_weight``, lambda_U = ``undesirable_weight``),
    averaged over the batch's rows. This is TRL's KTOTrainer (``loss_type="kto"``): the same reference point
    (its mean over the batch's mismatched pairs, clamped at 0, detached) and the same mean over desirable and
    undesirable rows together. TRL makes its mismatched pairs by cycling the completions of a batch by one;
    here each example gets the response of another prompt's example once, when the data is built (so the
    pairs of a batch are a sample of mismatched pairs of the data, as TRL's are of its batch). The paper
    recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the data is unbalanced.

    Args:
        policy_logps, ref_logps: (B, 2) summed log-probs of (y_b, y'_b) under x_b.
        rewards: (B, >= 1) labels in column 0. mask: (B, n) bool; rows without column 0 are left out, and
            the reference point averages the rows whose column 1 exists.
    Returns:
        ``loss``; metrics ``kl`` (z0), ``rewards/chosen`` and ``rewards/rejected`` (beta r_b over the
        desirable and the undesirable rows), ``rewards/margin``.
    """
    ref_logps = require(ref_logps, "reference log-probs", "kto")
    rewards = require(rewards, "binary labels (rewards[:, 0]: 1 desirable, 0 undesirable)", "kto")
    mask = default_mask(policy_logps, mask)
    rows = mask[:, 0]
    logratio = clean(policy_logps[:, 0] - ref_logps[:, 0], rows)
    if policy_logps.shape[1] > 1:
        kl_rows = mask[:, 1]
        kl_logratio = clean(policy_logps[:, 1] - ref_logps[:, 1], kl_rows)
        z0 = batch_mean(kl_logratio, kl_rows).detach().clamp(min=0)
    else:  # no mismatched pairs: the reference point is 0 (TRL's calculate_KL=False)
        z0 = torch.zeros((), dtype=logratio.dtype, device=logratio.device)
    desirable = clean(rewards[:, 0], rows) > 0.5
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))
    chosen = batch_mean(beta * logratio.detach(), rows & desirable)
    rejected = batch_mean(beta * logratio.detach(), rows & ~desirable)
    metrics = {"kl": z0, "rewards/chosen": chosen, "rewards/rejected": rejected,
               "rewards/margin": chosen - rejected}
    return LossOutput(batch_mean(losses, rows), metrics)
