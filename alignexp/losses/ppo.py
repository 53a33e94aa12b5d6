"""PPO for RLHF, as pure functions: KL-penalised per-token rewards, GAE, the clipped losses, KL controllers.

The RLHF objective (the proposal's Eq. 9; Ziegler et al. 2019, Eq. 2; Stiennon et al. 2020, Eq. 2):

    R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))

is distributed over the response's tokens y_1..y_T as in Ziegler et al. and Stiennon et al.:

    r_t = -beta * (log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)) + [t = T] * r(x, y)

so that sum_t r_t = R(x, y). PPO (Schulman et al. 2017) then maximises the clipped surrogate of
the GAE advantages (Schulman et al. 2016) of these rewards, with a clipped value loss and a fixed or
adaptive beta (Ziegler et al. 2019, Sec. 2.2).

Layout: per-token tensors are (B, T), one row per response, right-padded, with ``mask`` (B, T)
True on real tokens. Padded slots may hold anything (NaN included): they are replaced before any
arithmetic (:func:`alignexp.losses.common.clean`). Means are over the real tokens of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignexp.losses.common import clean
from alignexp.losses.registry import LossOutput, register_loss, require


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` over the True entries of ``mask`` (0 when there are none). Scalar."""
    values = clean(values, mask)
    return values.sum() / mask.sum().clamp(min=1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """The (population) variance of ``values`` over the True entries of ``mask``. Scalar."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(values - mean) / sqrt(var + eps)`` over the real tokens (the mean added back when not
    ``shift_mean``); padded slots hold 0. (B, T)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return clean(whitened, mask)


def kl_penalised_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards of the KL-penalised objective (module docstring; the proposal's Eq. 9).

        kl_t = log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)
        r_t  = -kl_coef * kl_t + [t = T] * r(x, y),   T the response's last real token

    Args:
        scores: (B,) the reward r(x, y) of each whole response.
        logprobs, ref_logprobs: (B, T) per-token log-probs under the policy that sampled (pi_old)
            and under the reference.
        mask: (B, T) bool, right-padded; every row has at least one real token.
        kl_coef: beta.
    Returns:
        ``rewards`` (B, T) and the per-token log-ratio ``kl`` (B, T), both 0 on padding; the row sums
        are ``scores - kl_coef * log(pi(y|x)/pi_ref(y|x))`` and ``log(pi(y|x)/pi_ref(y|x))``.
    """
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("kl_penalised_rewards: every response needs at least one token")
    kl = clean(logprobs - ref_logprobs, mask)
    rewards = -kl_coef * kl
    last = mask.sum(dim=1) - 1  # right padding: the last real token of each row
    rewards = rewards.scatter_add(1, last[:, None], scores.to(rewards.dtype)[:, None])
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eqs. 11-16).

        delta_t = r_t + gamma * V_{t+1} - V_t,     V_{T+1} = 0 after the last token (the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}  (= sum_l (gamma lam)^l delta_{t+l})
        R_t     = A_t + V_t                        (the value targets, the lambda-returns)

    Args:
        rewards, values: (B, T) per-token rewards and the values of the state before each token.
        mask: (B, T) bool, right-padded.
    Returns:
        ``advantages`` and ``returns``, each (B, T), 0 on padding; no gradient flows through them.
    """
    rewards, values = clean(rewards.detach(), mask), clean(values.detach(), mask)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(real, advantage, torch.zeros_like(advantage))
        next_value = torch.where(real, values[:, t], torch.zeros_like(next_value))
        next_advantage = advantages[:, t]
    return advantages, clean(advantages + values, mask)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_range: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise, per token.

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L     = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),   eps = ``clip_range``

    Args:
        logprobs: (B, T) under the policy being updated (with gradient); old_logprobs: (B, T) under
            the policy that sampled; advantages: (B, T); mask: (B, T) bool.
    Returns:
        The loss (scalar) and metrics: ``clipfrac`` (share of tokens where the clipped term is the
        larger), ``approx_kl`` (Schulman's estimator of KL(pi_old || pi): mean of rho - 1 - log rho),
        ``ratio`` (mean rho).
    """
    log_ratio = clean(logprobs - old_logprobs.detach(), mask)
    ratio = torch.exp(log_ratio)
    advantages = clean(advantages.detach(), mask)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
                   "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
                   "ratio": masked_mean(ratio, mask)}
    return loss, metrics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range_value: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped value loss of the PPO baselines and Ziegler et al. 2019's code, per token.

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v),   eps_v = ``clip_range_value``
        L      = 1/2 * mean_t max((V - R)^2, (V_clip - R)^2)

    Args:
        values: (B, T) current values (with gradient); old_values: (B, T) at rollout time;
        returns: (B, T) targets from :func:`gae`; mask: (B, T) bool.
    Returns:
        The loss (scalar) and metric ``vf_clipfrac`` (share of tokens where the clipped error is larger).
    """
    values = clean(values, mask)
    old_values, returns = clean(old_values.detach(), mask), clean(returns.detach(), mask)
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error, error_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((error_clipped > error).to(values.dtype), mask)}
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(R - V) / Var(R)`` over the real tokens: 1 for a perfect critic, 0 for a constant one.
    NaN when the returns do not vary. Scalar."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return torch.tensor(float("nan"), dtype=returns.dtype)
    return 1.0 - masked_var(returns - values, mask) / var_returns


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing changes."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, Sec. 2.2: beta follows a log-space proportional controller towards a target KL.

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + e_t * n_steps / horizon)

    where ``n_steps`` is the number of episodes (responses) behind KL_t, as in the authors' code
    (lm-human-preferences ``AdaptiveKLController``); with their horizon of 10000 and a batch of 512
    this is the paper's K_beta = 0.1 up to the batch size.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@register_loss("ppo", needs_reference=True, needs_rewards=True, min_responses=1, stage="ppo", data="prompts",
               per_token=True)
def ppo_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, old_logps: Tensor | None = None,
             advantages: Tensor | None = None, values: Tensor | None = None, old_values: Tensor | None = None,
             returns: Tensor | None = None, *,
             clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1) -> LossOutput:
    """The PPO objective on one minibatch of a rollout (Schulman et al. 2017, Eq. 9 without the entropy bonus).

        L = L_clip(policy_logps, old_logps, advantages) + vf_coef * L_value(values, old_values, returns)

    with L_clip from :func:`clipped_policy_loss` (Eq. 7) and L_value from :func:`clipped_value_loss`.
    The reference enters through the KL-penalised rewards behind ``advantages`` and ``returns``
    (:func:`kl_penalised_rewards`, :func:`gae`), computed once per rollout, so ``ref_logps`` and
    ``rewards`` are not read here.

    Tensors are **per token** (B, T), right-padded, with ``mask`` (B, T) bool (the registry's declared
    ``per_token`` exception to the (B, n) contract). The rollout, KL-controller and value-model settings
    are the ``ppo`` section's (:class:`alignexp.args.PPOArgs`), not this function's.

    Returns:
        ``loss``; metrics ``loss/policy``, ``loss/value``, ``clipfrac``, ``approx_kl``, ``ratio``,
        ``vf_clipfrac``.
    """
    mask = require(mask, "the per-token mask", "ppo").to(torch.bool)
    old_logps = require(old_logps, "the rollout's per-token log-probs (old_logps)", "ppo")
    advantages = require(advantages, "advantages", "ppo")
    values = require(values, "values", "ppo")
    old_values = require(old_values, "the rollout's values (old_values)", "ppo")
    returns = require(returns, "returns", "ppo")
    policy_loss, metrics = clipped_policy_loss(policy_logps, old_logps, advantages, mask, clip_range)
    value_loss, value_metrics = clipped_value_loss(values, old_values, returns, mask, clip_range_value)
    metrics.update(value_metrics)
    metrics["loss/policy"], metrics["loss/value"] = policy_loss.detach(), value_loss.detach()
    return LossOutput(policy_loss + vf_coef * value_loss, metrics)

