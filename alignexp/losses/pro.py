"""PRO: preference ranking optimisation (Song et al. 2023, "Preference Ranking Optimization for Human
Alignment", Eqs. 4-9, as in the authors' released code ``PRO/train/utils/process_manager.py``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignexp.losses.common import (
    batch_mean,
    clean,
    clean_lengths,
    comparable_rows,
    list_reward_metrics,
    ordered_pairs,
)
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require

PRO_EPS = 1e-10  # the constant inside the log of the authors' code


@register_loss("pro", needs_reference=False, listwise=True, uses_scores=True)
def pro_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             sft_weight: float = 0.05) -> LossOutput:
    """PRO: a softmax ranking loss at each position of the list, with reward-gap temperatures.

    With s_k = lp(y_k) / |y_k| (token-mean log-prob), for each k = 0 .. m-2 (k indexes from the best):

        1/T_k^i = r_k - r_i  for i > k,         1/T_k^k = max_{i > k} (r_k - r_i)
        L_k     = log(eps + exp(s_k / T_k^k) + sum_{i > k} exp(s_i / T_k^i)) - s_k / T_k^k
        L       = sum_k L_k + sft_weight * (m - 1)^2 * (-lp(y_0))

    eps = 1e-10, computed exactly as log(eps + ...) via a logsumexp that includes log(eps) (so, as in
    the authors' code, eps dominates once every s/T in the sum falls below log(eps) ~ -23).
    Without ``rewards`` every temperature is 1 (the paper's plain PRO, Eq. 5). The SFT term is on
    the **summed** log-prob of the best response and is scaled by (m - 1)^2, m the list length,
    as in the released code (``sft_weight * (training_stage_num - 1)^2``); their scripts use
    ``sft_weight = 0.05``, our default.

    Ties: the sums over i > k run over the responses strictly worse than y_k (rewards r_i < r_k), and a
    position with none (y_k ties with every response after it) has no term; a list of tied responses
    only is left out of the batch mean (:func:`alignexp.losses.common.ordered_pairs`, the treatment
    every listwise loss shares). The authors' code instead keeps a tied y_i in y_k's softmax with
    1/T = r_k - r_i = 0, i.e. a constant e^0 = 1 added to the denominator whatever the policy does.

    Args:
        policy_logps: (B, n) summed log-probs, best first; lengths: (B, n) response tokens.
        rewards: optional (B, n) scores, best first (NaN allowed in masked slots). mask: (B, n) bool;
            m counts each row's existing responses.
    Returns:
        ``loss``; metrics ``loss/rank``, ``loss/sft`` and ``scores/*`` on s (best vs the others,
        ordering accuracy over the ranking).
    """
    lengths = require(lengths, "response lengths", "pro")
    mask = default_mask(policy_logps, mask)
    logps = clean(policy_logps, mask)
    s = logps / clean_lengths(lengths, mask, logps.dtype)
    later = ordered_pairs(mask, rewards)  # [b, k, i]: y_i strictly worse than y_k, both exist
    has_later = later.any(dim=2)
    if rewards is None:
        inv_t = torch.ones_like(later, dtype=s.dtype)
        inv_t_self = torch.ones_like(s)
    else:
        r = clean(rewards.to(s.dtype), mask)
        inv_t = r[:, :, None] - r[:, None, :]
        best_gap = inv_t.masked_fill(~later, float("-inf")).amax(dim=2)
        inv_t_self = torch.where(has_later, best_gap, torch.zeros_like(best_gap))
    positive = s * inv_t_self  # s_k / T_k^k
    n = s.shape[1]
    logits = (s[:, None, :] * inv_t).masked_fill(~later, torch.finfo(s.dtype).min)  # [b, k, i]
    log_eps = torch.full((s.shape[0], n, 1), math.log(PRO_EPS), dtype=s.dtype, device=s.device)
    lse = torch.logsumexp(torch.cat([positive[:, :, None], logits, log_eps], dim=2), dim=2)
    rank = torch.where(has_later, lse - positive, torch.zeros_like(lse)).sum(dim=1)
    m = mask.sum(dim=1).to(s.dtype)
    sft = sft_weight * (m - 1) ** 2 * (-logps[:, 0])
    rows = comparable_rows(later)
    metrics = {"loss/rank": batch_mean(rank.detach(), rows), "loss/sft": batch_mean(sft.detach(), rows)}
    metrics.update(list_reward_metrics(s, mask, later, prefix="scores"))
    return LossOutput(batch_mean(rank + sft, rows), metrics)
