"""DPO's pairwise variants, each the loss of a paper on the implicit reward beta * log pi/pi_ref of a
(chosen, rejected) pair: RPO, APO, NCA, EXO, robust DPO, BCO, SPPO (hard labels), DiscoPOP and AOT.

TRL 1.16 has each as a ``loss_type`` of its DPOTrainer (RPO as ``["sigmoid", "sft"]``); the equations below
are TRL's, checked against it on the same tensors (tests/unit/test_trl_parity.py). One difference holds for
all of them, on purpose: TRL applies its ``f_divergence_type`` to every loss type's margin; here only ``dpo``
takes an ``f_divergence`` (f-DPO is a generalisation of DPO's loss, not of these), so these use the plain
log-ratios (TRL's default, ``reverse_kl``). Notation: c = lp(y0) - lr(y0), r = lp(y1) - lr(y1) (summed
log-probs), h = c - r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import batch_mean, clean, pair_mask, pair_reward_metrics, pooled_nll
from alignexp.losses.dpo import pair_logratios
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require


def _pair(policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor | None, name: str):
    """(rows, c, r, mask) of a pairwise loss: the rows holding a pair and the chosen/rejected log-ratios."""
    ref_logps = require(ref_logps, "reference log-probs", name)
    mask = default_mask(policy_logps, mask)
    chosen, rejected = pair_logratios(policy_logps, ref_logps, mask)
    return pair_mask(mask), chosen, rejected, mask


def _output(losses: Tensor, rows: Tensor, beta: float, chosen: Tensor, rejected: Tensor,
            extra: dict[str, Tensor] | None = None) -> LossOutput:
    metrics = pair_reward_metrics(beta * chosen, beta * rejected, rows)
    metrics.update(extra or {})
    return LossOutput(batch_mean(losses, rows), metrics)


@register_loss("rpo", needs_reference=True)
def rpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 1): DPO plus the NLL of the
    chosen response.

        L = -mean_b log sigmoid(beta h) + alpha * NLL(y0)

    NLL(y0) is the chosen responses' token-mean NLL pooled over the batch (summed NLL over total chosen
    tokens), as TRL computes its ``sft`` loss type; RPO is TRL's ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1, alpha]``. (The paper divides each example's NLL by its own length before the batch
    mean; pooled, a long response weighs by its tokens.)

    Returns: ``loss``; metrics ``loss/dpo``, ``loss/nll`` and ``rewards/*``.
    """
    lengths = require(lengths, "response lengths", "rpo")
    rows, chosen, rejected, mask = _pair(policy_logps, ref_logps, mask, "rpo")
    dpo = batch_mean(-F.logsigmoid(beta * (chosen - rejected)), rows)
    nll = pooled_nll(clean(policy_logps[:, 0], mask[:, 0]), lengths[:, 0], rows)
    metrics = pair_reward_metrics(beta * chosen, beta * rejected, rows)
    metrics.update({"loss/dpo": dpo.detach(), "loss/nll": nll.detach()})
    return LossOutput(dpo + alpha * nll, metrics)


@register_loss("apo_zero", needs_reference=True)
def apo_zero_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                  rewards: Tensor | None = None, mask: Tensor | None = None, *, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    Eq. 7): raise the chosen likelihood and lower the rejected one, each anchored at the reference.

        L = (1 - sigmoid(beta c)) + sigmoid(beta r)

    For chosen responses better than the model's own outputs. TRL: ``loss_type="apo_zero"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "apo_zero")
    losses = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("apo_down", needs_reference=True)
def apo_down_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                  rewards: Tensor | None = None, mask: Tensor | None = None, *, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both likelihoods, the rejected one more.

        L = sigmoid(beta c) + (1 - sigmoid(beta (c - r)))

    For chosen responses worse than the model's own outputs. TRL: ``loss_type="apo_down"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "apo_down")
    losses = torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected)))
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("nca", needs_reference=True)
def nca_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *, beta: float = 0.1) -> LossOutput:
    """NCA on pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    the pairwise preference case of Eq. 11): each response's own reward, not only their difference, is
    trained, so the chosen likelihood is not pushed down with the rejected one.

        L = -log sigmoid(beta c) - 1/2 log sigmoid(-beta c) - 1/2 log sigmoid(-beta r)

    TRL: ``loss_type="nca_pair"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "nca")
    c, r = beta * chosen, beta * rejected
    losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("exo", needs_reference=True,
               constraints={"label_smoothing": (lambda v: 0 < v < 0.5, "in (0, 0.5) (EXO takes log(eps))")})
def exo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO on pairs (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    Eq. 16, K = 2): the reverse KL from the label distribution p = (1 - eps, eps) to the model's
    q = softmax(beta c, beta r) over the pair, which makes it mode-seeking where DPO is mean-seeking.

        L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),   q_w = sigmoid(beta h), q_l = sigmoid(-beta h)

    eps = ``label_smoothing`` must be > 0 (1e-3, as TRL's documentation recommends). TRL: ``loss_type="exo_pair"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "exo")
    logits = beta * (chosen - rejected)
    eps = torch.tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("robust", needs_reference=True)
def robust_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                rewards: Tensor | None = None, mask: Tensor | None = None, *,
                beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    Eq. 9): an unbiased estimate of the clean-label loss when each label flips with probability eps.

        L = [ -(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h) ] / (1 - 2 eps)

    (unlike cDPO, the flipped term is *subtracted*.) eps = ``label_smoothing`` in [0, 0.5). TRL: ``loss_type="robust"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "robust")
    logits = beta * (chosen - rejected)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) \
        / (1 - 2 * label_smoothing)
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("bco", needs_reference=True)
def bco_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *, beta: float = 0.1) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"):
    a binary classifier of chosen (label 1) against rejected (label 0) on the implicit reward.

        L = -log sigmoid(beta c) - log sigmoid(-beta r)

    TRL's ``loss_type="bco_pair"``, which leaves out the paper's reward shift delta (a running mean of the
    rewards, Eq. 8); so does this loss.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "bco")
    losses = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("sppo_hard", needs_reference=True)
def sppo_hard_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                   rewards: Tensor | None = None, mask: Tensor | None = None, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    Eq. 4.7 with P = 1 for the winner and 0 for the loser): each log-ratio regressed onto +-1/(2 beta).

        L = (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2

    ``beta`` is the paper's 1/eta. TRL: ``loss_type="sppo_hard"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "sppo_hard")
    losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("discopop", needs_reference=True)
def discopop_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
                  rewards: Tensor | None = None, mask: Tensor | None = None, *,
                  beta: float = 0.1, tau: float = 0.05) -> LossOutput:
    """DiscoPOP (Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", Eq. 5; their LRML, log-ratio modulated loss): DPO's logistic loss blended with an exponential
    loss by a sigmoid of the margin.

        rho = beta h,  w = sigmoid(rho / tau),  L = (1 - w) (-log sigmoid(rho)) + w exp(-rho)

    ``tau`` 0.05 as TRL's ``discopop_tau``. TRL: ``loss_type="discopop"``.
    """
    rows, chosen, rejected, _ = _pair(policy_logps, ref_logps, mask, "discopop")
    logits = beta * (chosen - rejected)
    weight = torch.sigmoid(logits / tau)
    losses = -F.logsigmoid(logits) * (1 - weight) + torch.exp(-logits) * weight
    return _output(losses, rows, beta, chosen, rejected)


@register_loss("aot", needs_reference=True)
def aot_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT on pairs (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    Eq. 9, the paired variant): first-order stochastic dominance of the policy's margins over the
    reference's, by sorting each over the batch (the 1-D optimal transport plan) and comparing quantiles.

        m_b = lp(y0_b) - lp(y1_b),  m'_b = lr(y0_b) - lr(y1_b),  d = sort(m) - sort(m')
        L = mean_b [ -(1 - eps) log sigmoid(beta d_b) - eps log sigmoid(-beta d_b) ]

    The sort runs over the rows that hold a pair, so the loss of a row depends on the whole batch (the
    method's point: it aligns distributions, not pairs). TRL: ``loss_type="aot"``.
    """
    rows, chosen, rejected, mask = _pair(policy_logps, ref_logps, mask, "aot")
    logps, refs = clean(policy_logps[:, :2], mask[:, :2]), clean(ref_logps[:, :2], mask[:, :2])
    margins, ref_margins = (logps[:, 0] - logps[:, 1])[rows], (refs[:, 0] - refs[:, 1])[rows]
    delta = torch.sort(margins, dim=0).values - torch.sort(ref_margins, dim=0).values
    losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    loss = losses.sum() / rows.sum().clamp(min=1).to(losses.dtype)
    metrics = pair_reward_metrics(beta * chosen, beta * rejected, rows)
    return LossOutput(loss, metrics)
