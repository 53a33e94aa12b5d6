"""DPO and conservative DPO (Rafailov et al. 2023, Eq. 7; Mitchell 2023 for label smoothing), with
length normalisation (TRL's ``sigmoid_norm``; Tulu 3's length-normalised DPO) and f-divergences (f-DPO,
Wang et al. 2024, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
Constraints")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignexp.losses.common import batch_mean, clean, clean_lengths, pair_mask, pair_reward_metrics
from alignexp.losses.registry import LossOutput, default_mask, register_loss, require

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def pair_logratios(policy_logps: Tensor, ref_logps: Tensor,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-ratios log pi/pi_ref of the first two columns, each (B,).

    With ``mask``, slots that do not exist hold 0 (so that they never carry NaN into a gradient).
    """
    logratios = policy_logps[:, :2] - ref_logps[:, :2]
    if mask is not None:
        logratios = clean(logratios, mask[:, :2])
    return logratios[:, 0], logratios[:, 1]


def f_divergence_score(logratio: Tensor, f_divergence: str, f_alpha: float = 0.5) -> Tensor:
    """f'(t) at t = pi/pi_ref = exp(``logratio``): the implicit reward of f-DPO (Wang et al. 2024, Thm. 1).

    ``reverse_kl``: log t (DPO). ``forward_kl``: 1 - 1/t. ``js_divergence``: log(2t / (1 + t)) =
    log 2 + log sigmoid(log t). ``alpha_divergence``: (t^(f_alpha - 1) - 1) / (f_alpha - 1), TRL's
    parametrisation, which is the paper's (1 - t^-alpha) / alpha with alpha = 1 - f_alpha (the two agree at
    the default 0.5); f_alpha = 1 is the limit log t. The exponent is clamped at 80, as TRL does, so that
    exp stays finite in fp32.
    """
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratio
        return (torch.exp(((f_alpha - 1.0) * logratio).clamp(max=80.0)) - 1.0) / (f_alpha - 1.0)
    raise ValueError(f"loss.f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}")


def check_dpo(hparams: dict) -> None:
    """``f_divergence`` is one of :data:`F_DIVERGENCES`; ``f_alpha`` > 0."""
    if hparams.get("f_divergence", "reverse_kl") not in F_DIVERGENCES:
        raise ValueError(f"loss.f_divergence must be one of {', '.join(F_DIVERGENCES)}, "
                         f"got {hparams.get('f_divergence')!r}")
    f_alpha = hparams.get("f_alpha", 0.5)
    if isinstance(f_alpha, (int, float)) and not isinstance(f_alpha, bool) and f_alpha <= 0:
        raise ValueError(f"loss.f_alpha must be > 0, got {f_alpha}")


@register_loss("dpo", needs_reference=True, aliases=("cdpo",), check=check_dpo)
def dpo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             beta: float = 0.1, label_smoothing: float = 0.0, length_normalize: bool = False,
             f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """DPO on the pair (column 0 chosen, column 1 rejected).

    With s_k = f'(pi(y_k)/pi_ref(y_k)) the implicit reward of the f-divergence (``f_divergence``, see
    :func:`f_divergence_score`; reverse KL, the default, gives s_k = lp(y_k) - lr(y_k)), optionally divided
    by the response's length |y_k| (``length_normalize``), h = s_0 - s_1 and eps = ``label_smoothing``:

        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    eps = 0 is DPO (Rafailov et al. 2023, Eq. 7); eps > 0 is conservative DPO (cDPO), which assumes each
    label is flipped with probability eps. ``length_normalize=true`` is TRL's ``sigmoid_norm`` (Tulu 3's
    length-normalised DPO: Lambert et al. 2024, Eq. 6, log-ratios averaged over tokens); other f-divergences
    are f-DPO (Wang et al. 2024, Eq. 12), TRL's ``f_divergence_type`` with ``f_alpha_divergence_coef``.

    Args:
        policy_logps, ref_logps: (B, n >= 2) summed response log-probs; only columns 0 and 1 are used.
        lengths: (B, n) response tokens; needed only with ``length_normalize``.
        mask: (B, n) bool; rows whose first two slots do not both exist are left out of the mean.
    Returns:
        ``loss`` (scalar batch mean); metrics ``rewards/chosen``, ``rewards/rejected`` (beta * log-ratio, as
        TRL logs them for every f-divergence), ``rewards/margin`` and ``rewards/accuracy`` (batch means).
    """
    ref_logps = require(ref_logps, "reference log-probs", "dpo")
    mask = default_mask(policy_logps, mask)
    rows = pair_mask(mask)
    chosen, rejected = pair_logratios(policy_logps, ref_logps, mask)
    s_chosen = f_divergence_score(chosen, f_divergence, f_alpha)
    s_rejected = f_divergence_score(rejected, f_divergence, f_alpha)
    if length_normalize:
        lengths = clean_lengths(require(lengths, "response lengths (length_normalize=true)", "dpo")[:, :2],
                                mask[:, :2], chosen.dtype)
        s_chosen, s_rejected = s_chosen / lengths[:, 0], s_rejected / lengths[:, 1]
    logits = beta * (s_chosen - s_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(batch_mean(losses, rows), pair_reward_metrics(beta * chosen, beta * rejected, rows))
