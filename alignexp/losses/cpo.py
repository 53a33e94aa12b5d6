"""CPO (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
Machine Translation") and ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
Reference Model"): reference-free preference terms beside an NLL term on the chosen response."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import (
    batch_mean,
    clean,
    pair_mask,
    pair_reward_metrics,
    pooled_nll,
    token_mean_logps,
)
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


@register_loss("cpo", needs_reference=False)
def cpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """CPO on the pair (column 0 chosen, column 1 rejected); no reference model.

        L = -mean_b log sigmoid(beta [lp(y0) - lp(y1)])  +  alpha * NLL(y0)      (Xu et al. 2024, Eq. 3-5)

    DPO with the reference dropped (its uniform-reference upper bound), plus the behaviour-cloning term
    NLL(y0): the chosen responses' token-mean NLL pooled over the batch (their summed NLL over their total
    tokens: :func:`alignexp.losses.common.pooled_nll`), as TRL's CPOTrainer computes it. Log-probs are summed
    over tokens (TRL's ``loss_type="sigmoid"``). ``alpha`` is TRL's ``cpo_alpha`` (TRL's own ``alpha`` is
    AlphaPO's reward shape, which is not this).

    Args:
        policy_logps: (B, n >= 2) summed log-probs; columns 0 and 1. lengths: (B, n) tokens (for the NLL).
        mask: (B, n) bool; rows without both slots are left out.
    Returns:
        ``loss``; metrics ``loss/pref``, ``loss/nll`` and ``rewards/*`` (beta * lp, as TRL logs them).
    """
    lengths = require(lengths, "response lengths", "cpo")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    logps = clean(policy_logps[:, :2], mask[:, :2])
    pref = batch_mean(-F.logsigmoid(beta * (logps[:, 0] - logps[:, 1])), rows)
    nll = pooled_nll(logps[:, 0], lengths[:, 0], rows)
    metrics = {"loss/pref": pref.detach(), "loss/nll": nll.detach()}
    metrics.update(pair_reward_metrics(beta * logps[:, 0], beta * logps[:, 1], rows))
    return LossOutput(pref + alpha * nll, metrics)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, stably (Maechler 2012: log(-expm1(x)) near 0, log1p(-e^x) below -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_loss("orpo", needs_reference=False)
def orpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
              rewards: Tensor | None = None, mask: Tensor | None = None, *,
              beta: float = 0.1) -> LossOutput:
    """ORPO on the pair (column 0 chosen, column 1 rejected); no reference model.

    With P_k = exp(lp(y_k) / |y_k|) the token-mean probability of y_k and odds(y) = P / (1 - P):

        L = NLL(y0) - beta * mean_b log sigmoid( log odds(y0) - log odds(y1) )     (Hong et al. 2024, Eq. 6-7)

    where log odds(y) = lp/|y| - log(1 - exp(lp/|y|)) and ``beta`` is the paper's lambda (TRL's default
    0.1). Differs from TRL's ORPOTrainer on purpose in the NLL term only: TRL takes it over the chosen
    sequence's prompt *and* response tokens; here it is over the chosen response's tokens (pooled over the
    batch, :func:`alignexp.losses.common.pooled_nll`), the paper's L_SFT and the NLL of every other loss of
    this framework (whose log-prob contract has response tokens only). The odds-ratio term is TRL's.

    Args:
        policy_logps: (B, n >= 2) summed log-probs; columns 0 and 1. lengths: (B, n) response tokens (required:
            the odds are on token-mean probabilities). mask: (B, n) bool; rows without both slots are left out.
    Returns:
        ``loss``; metrics ``loss/nll``, ``loss/or`` (-beta * mean log sigmoid(log odds ratio)), ``log_odds_ratio``
        and ``rewards/*`` (beta * token-mean log-prob, as TRL logs them).
    """
    lengths = require(lengths, "response lengths", "orpo")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    mean_logps = token_mean_logps(policy_logps[:, :2], lengths[:, :2], mask[:, :2])
    # a token-mean log-prob of exactly 0 (probability 1) has infinite odds: keep it just below
    mean_logps = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    log_odds = (mean_logps[:, 0] - mean_logps[:, 1]) - (log1mexp(mean_logps[:, 0]) - log1mexp(mean_logps[:, 1]))
    ratio = F.logsigmoid(log_odds)
    odds_term = -beta * batch_mean(ratio, rows)
    nll = pooled_nll(clean(policy_logps[:, 0], mask[:, 0]), lengths[:, 0], rows)
    metrics = {"loss/nll": nll.detach(), "loss/or": odds_term.detach(),
               "log_odds_ratio": batch_mean(log_odds.detach(), rows)}
    metrics.update(pair_reward_metrics(beta * mean_logps[:, 0], beta * mean_logps[:, 1], rows))
    return LossOutput(nll + odds_term, metrics)
