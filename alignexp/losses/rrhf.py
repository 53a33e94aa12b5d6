"""RRHF: rank responses to align language models with human feedback (Yuan et al. 2023, Eqs. 1-4)."""

from __future__ import annotations

import torch
from torch import Tensor

from alignexp.losses.common import (
    batch_mean,
    clean,
    clean_lengths,
    comparable_rows,
    list_reward_metrics,
    ordered_pairs,
    position_labels,
)
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("rrhf", needs_reference=False, listwise=True, uses_scores=True)
def rrhf_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
              rewards: Tensor | None = None, mask: Tensor | None = None, *,
              rank_weight: float = 1.0) -> LossOutput:
    """RRHF's ranking loss on length-normalised log-probs plus SFT on the best response.

        p_i    = lp(y_i) / |y_i|                                               (Eq. 1)
        L_rank = sum over pairs with r_i < r_j of max(0, p_i - p_j)            (Eq. 2)
        L_ft   = -lp(y_best),  y_best = argmax_i r_i                           (Eq. 3)
        L      = rank_weight * L_rank + L_ft                                   (Eq. 4 has weight 1)

    - |y_i| is the **true** response length. (The authors' released ``train.py`` takes the SFT
      term as ``-logit_label[best].mean()``, an average over the padded width of the batch; that
      is not the paper's loss and is not copied here.)
    - L_ft is the **summed** token log-likelihood of y_best, as in the paper's Eq. 3
      (-sum_t log P(y_best,t | x, y_best,<t)), not length-normalised.
    - Tied rewards make no pair (:func:`alignexp.losses.common.ordered_pairs`); y_best is the first
      of the tied best; a list of tied responses only is left out of the batch mean. Without
      ``rewards`` the ranking order gives them (r = m - 1 - k for column k of a list of m responses).
    - ``rank_weight`` defaults to 1, the paper's Eq. 4 and the authors' ``train.sh``
      (``--rrhf_weight 1``; their code's argparse default of 100 goes with the padded-mean SFT term).

    Args:
        policy_logps: (B, n) summed log-probs, best first; lengths: (B, n) response tokens.
        rewards: optional (B, n) scores (NaN allowed in masked slots). mask: (B, n) bool.
    Returns:
        ``loss``; metrics ``loss/rank`` (weighted), ``loss/sft``, and ``scores/*`` on p
        (best vs the others, and the share of reward-ordered pairs that p orders correctly).
    """
    lengths = require(lengths, "response lengths", "rrhf")
    mask = default_mask(policy_logps, mask)
    logps = clean(policy_logps, mask)
    p = logps / clean_lengths(lengths, mask, logps.dtype)
    r = position_labels(mask, logps.dtype) if rewards is None else clean(rewards.to(logps.dtype), mask)
    better = ordered_pairs(mask, rewards)
    pair = better.transpose(1, 2)  # [b, i, j]: r_i < r_j
    rank = torch.where(pair, torch.relu(p[:, :, None] - p[:, None, :]), torch.zeros_like(pair, dtype=p.dtype))
    rank = rank.sum(dim=(1, 2))
    best = r.masked_fill(~mask, float("-inf")).argmax(dim=1)  # first maximum on ties
    sft = -logps.gather(1, best[:, None]).squeeze(1)
    rows = comparable_rows(better)
    metrics = {"loss/rank": batch_mean(rank_weight * rank.detach(), rows),
               "loss/sft": batch_mean(sft.detach(), rows)}
    metrics.update(list_reward_metrics(p, mask, better, prefix="scores"))
    return LossOutput(batch_mean(rank_weight * rank + sft, rows), metrics)
