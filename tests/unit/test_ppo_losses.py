"""Unit tests of PPO's pure functions (alignexp/losses/ppo.py) against values worked out by hand.

Layout: per-token tensors (B, T), right-padded, ``mask`` True on real tokens; padded slots hold
NaN here on purpose, to check that they never reach a value or a gradient.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from alignexp.args import PPOArgs, from_mapping
from alignexp.errors import ConfigError
from alignexp.losses import check_hparams, get_loss, register_loss
from alignexp.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalised_rewards,
    whiten,
)

NAN = float("nan")
CONF = Path(__file__).resolve().parents[2] / "conf"
LOSS_CONF, PPO_CONF = CONF / "loss" / "ppo.yaml", CONF / "ppo" / "default.yaml"


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def m(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- KL-penalised reward (Eq. 9)


def test_kl_penalised_rewards_by_hand():
    """beta = 0.5.

    Row 0 (3 tokens): log pi = [-1, -2, -0.5], log pi_ref = [-1.5, -1, -0.5], r(x, y) = 1.
        kl = [0.5, -1, 0];  rewards = -0.5 * kl + [0, 0, 1] = [-0.25, 0.5, 1.0]
        sum = 1.25 = r - beta * (log pi(y) - log pi_ref(y)) = 1 - 0.5 * (-3.5 - (-3.0))     (Eq. 9)
    Row 1 (2 tokens, one pad): log pi = [-0.2, -0.3], log pi_ref = [-0.7, -0.3], r(x, y) = -0.5.
        kl = [0.5, 0];  rewards = [-0.25, 0 - 0.5] = [-0.25, -0.5];  sum = -0.75 = -0.5 - 0.5 * 0.5
    """
    rewards, kl = kl_penalised_rewards(t([1.0, -0.5]), t([[-1, -2, -0.5], [-0.2, -0.3, NAN]]),
                                       t([[-1.5, -1, -0.5], [-0.7, -0.3, NAN]]),
                                       m([[1, 1, 1], [1, 1, 0]]), kl_coef=0.5)
    close(rewards, [[-0.25, 0.5, 1.0], [-0.25, -0.5, 0.0]])
    close(kl, [[0.5, -1.0, 0.0], [0.5, 0.0, 0.0]])
    close(rewards.sum(dim=1), [1.25, -0.75])


def test_kl_penalised_rewards_sum_to_eq9_on_random_rows():
    """sum_t r_t = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) for any lengths (the proposal's Eq. 9)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 4, 7, 3])
    mask = torch.arange(7)[None] < lengths[:, None]
    logps = -torch.rand(4, 7, generator=generator, dtype=torch.float64) * 3
    ref = -torch.rand(4, 7, generator=generator, dtype=torch.float64) * 3
    scores = torch.randn(4, generator=generator, dtype=torch.float64)
    rewards, _ = kl_penalised_rewards(scores, logps, ref, mask, kl_coef=0.2)
    sequence_logratio = (logps * mask).sum(1) - (ref * mask).sum(1)
    close(rewards.sum(dim=1), scores - 0.2 * sequence_logratio)
    assert torch.all(rewards[~mask] == 0)


def test_kl_penalised_rewards_reject_empty_responses():
    with pytest.raises(ValueError, match="at least one token"):
        kl_penalised_rewards(t([1.0]), t([[0.0]]), t([[0.0]]), m([[0]]), 0.1)


# --------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    """gamma = 1, lam = 0.5; V after the last token is 0.

    Row 0: r = [0, 0, 1], V = [0.5, 0.25, 0.5]
        delta_2 = 1 + 0 - 0.5 = 0.5          A_2 = 0.5
        delta_1 = 0 + 0.5 - 0.25 = 0.25      A_1 = 0.25 + 0.5 * 0.5 = 0.5
        delta_0 = 0 + 0.25 - 0.5 = -0.25     A_0 = -0.25 + 0.5 * 0.5 = 0
        R = A + V = [0.5, 0.75, 1.0]
    Row 1 (2 tokens, pad holds NaN): r = [0.5, 2], V = [1, 1]
        delta_1 = 2 + 0 - 1 = 1              A_1 = 1
        delta_0 = 0.5 + 1 - 1 = 0.5          A_0 = 0.5 + 0.5 * 1 = 1.0
        R = [2, 2]
    """
    advantages, returns = gae(t([[0, 0, 1], [0.5, 2, NAN]]), t([[0.5, 0.25, 0.5], [1, 1, NAN]]),
                              m([[1, 1, 1], [1, 1, 0]]), gamma=1.0, lam=0.5)
    close(advantages, [[0.0, 0.5, 0.5], [1.0, 1.0, 0.0]])
    close(returns, [[0.5, 0.75, 1.0], [2.0, 2.0, 0.0]])


def test_gae_limits_by_hand():
    """r = [1, 1], V = [0.25, 0.5].
    gamma = 0.5, lam = 1 (Monte-Carlo): A_t = sum_l gamma^l r_{t+l} - V_t = [1 + 0.5 - 0.25, 1 - 0.5]
        = [1.25, 0.5]; the returns are the discounted returns [1.5, 1].
    gamma = 0.5, lam = 0 (one-step TD): A_t = r_t + gamma V_{t+1} - V_t = [1 + 0.25 - 0.25, 1 - 0.5] = [1, 0.5].
    """
    rewards, values, mask = t([[1, 1]]), t([[0.25, 0.5]]), m([[1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    close(advantages, [[1.25, 0.5]])
    close(returns, [[1.5, 1.0]])
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.0)
    close(advantages, [[1.0, 0.5]])


# --------------------------------------------------------------------------- the clipped losses


def test_clipped_policy_loss_by_hand():
    """eps = 0.2. Four tokens (rho = exp(log pi - log pi_old), A) and their loss max(-A rho, -A clip(rho)):
        rho = 1.5, A = 1:   max(-1.5, -1.2) = -1.2   clipped
        rho = 0.5, A = -2:  max(1.0, 1.6)   = 1.6    clipped
        rho = 1.1, A = 1:   max(-1.1, -1.1) = -1.1   inside the clip range
        rho = 0.5, A = 1:   max(-0.5, -0.8) = -0.5   pessimistic: the unclipped term
    L = (-1.2 + 1.6 - 1.1 - 0.5) / 4 = -0.3; clipfrac = 2/4.
    approx_kl = mean(rho - 1 - ln rho) = (0.094535 + 0.193147 + 0.004690 + 0.193147) / 4 = 0.121380.
    Gradients d L / d log pi: 0 on clipped tokens, -A rho / 4 otherwise: [0, 0, -0.275, -0.125].
    """
    old = t([[0.0, 0.0, 0.0], [0.0, NAN, NAN]])
    logps = t([[math.log(1.5), math.log(0.5), math.log(1.1)], [math.log(0.5), NAN, NAN]]).requires_grad_(True)
    advantages = t([[1, -2, 1], [1, NAN, NAN]])
    mask = m([[1, 1, 1], [1, 0, 0]])
    loss, metrics = clipped_policy_loss(logps, old, advantages, mask, clip_range=0.2)
    close(loss, -0.3)
    close(metrics["clipfrac"], 0.5)
    close(metrics["approx_kl"], (0.5 - math.log(1.5) + (-0.5 + math.log(2)) * 2 + 0.1 - math.log(1.1)) / 4)
    assert abs(float(metrics["approx_kl"]) - 0.121380) < 1e-6
    loss.backward()
    close(logps.grad, [[0.0, 0.0, -0.275], [-0.125, 0.0, 0.0]])


def test_clipped_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    """rho = 1 everywhere (the first minibatch of a rollout): L = -mean(A), nothing clipped, approx_kl = 0."""
    logps = t([[-1.0, -2.0]])
    loss, metrics = clipped_policy_loss(logps, logps.clone(), t([[0.5, -1.5]]), m([[1, 1]]))
    close(loss, 0.5)
    close(metrics["clipfrac"], 0.0)
    close(metrics["approx_kl"], 0.0)


def test_clipped_value_loss_by_hand():
    """eps_v = 0.2. Tokens (V, V_old, R), V_clip = V_old + clip(V - V_old, -0.2, 0.2):
        (0.5, 0, 1):   (V-R)^2 = 0.25, V_clip = 0.2, (V_clip-R)^2 = 0.64 -> 0.64   clipped
        (0.9, 1, 0):   V_clip = V = 0.9, both 0.81                         -> 0.81
        (1.5, 1, 1):   (V-R)^2 = 0.25, V_clip = 1.2, 0.04                   -> 0.25
    L = 1/2 * (0.64 + 0.81 + 0.25) / 3 = 0.283333...; vf_clipfrac = 1/3.
    Gradient d L / d V = (V - R) / 3 where the unclipped term counts, 0 on the clipped token:
        [0, 0.9 / 3, 0.5 / 3] = [0, 0.3, 0.166667].
    """
    values = t([[0.5, 0.9, 1.5, NAN]]).requires_grad_(True)
    mask = m([[1, 1, 1, 0]])
    loss, metrics = clipped_value_loss(values, t([[0, 1, 1, NAN]]), t([[1, 0, 1, NAN]]), mask, 0.2)
    close(loss, 1.70 / 6)
    close(metrics["vf_clipfrac"], 1 / 3)
    loss.backward()
    close(values.grad, [[0.0, 0.3, 0.5 / 3, 0.0]])


def test_ppo_loss_is_the_surrogate_plus_vf_coef_times_the_value_loss():
    """The registered ``ppo`` loss on the two examples above: -0.3 + 0.5 * 0.283333 = -0.158333."""
    mask = m([[1, 1, 1], [1, 0, 0]])
    logps = t([[math.log(1.5), math.log(0.5), math.log(1.1)], [math.log(0.5), NAN, NAN]])
    values = t([[0.5, 0.9, 1.5], [0.0, NAN, NAN]])
    old_values, returns = t([[0, 1, 1], [0, NAN, NAN]]), t([[1, 0, 1], [0, NAN, NAN]])
    out = get_loss("ppo")(logps, mask=mask, old_logps=torch.zeros_like(logps), advantages=t([[1, -2, 1], [1, 0, 0]]),
                          values=values, old_values=old_values, returns=returns, clip_range=0.2,
                          clip_range_value=0.2, vf_coef=0.5)
    # the fourth value token (V = V_old = R = 0) adds 0 to the value loss and counts in its mean: 1.70 / 8
    close(out.loss, -0.3 + 0.5 * 1.70 / 8)
    close(out.metrics["loss/policy"], -0.3)
    close(out.metrics["loss/value"], 1.70 / 8)
    with pytest.raises(ValueError, match="old_logps"):
        get_loss("ppo")(logps, mask=mask)


# --------------------------------------------------------------------------- whitening, explained variance


def test_whiten_by_hand():
    """[1, 2, 3] (pad NaN): mean 2, population variance 2/3 -> (x - 2) / sqrt(2/3) = [-1.224745, 0, 1.224745]."""
    whitened = whiten(t([[1, 2], [3, NAN]]), m([[1, 1], [1, 0]]), eps=0.0)
    close(whitened, [[-math.sqrt(1.5), 0.0], [math.sqrt(1.5), 0.0]])
    close(whiten(t([[1, 2, 3]]), m([[1, 1, 1]]), shift_mean=False, eps=0.0), [[2 - math.sqrt(1.5), 2.0,
                                                                                  2 + math.sqrt(1.5)]])


def test_explained_variance_by_hand():
    """R = [1, 2, 3]: V = R explains all (1); V = 2 (the mean) nothing (0); V = [1, 2, 2]: Var(R - V) =
    Var([0, 0, 1]) = 2/9 over Var(R) = 2/3, so 1 - 1/3 = 2/3. Constant returns: NaN."""
    returns, mask = t([[1, 2, 3]]), m([[1, 1, 1]])
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(t([[2, 2, 2]]), returns, mask), 0.0)
    close(explained_variance(t([[1, 2, 2]]), returns, mask), 2 / 3)
    assert math.isnan(float(explained_variance(returns, t([[1, 1, 1]]), mask)))


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    """Ziegler et al. 2019: e = clip(KL / 6 - 1, -0.2, 0.2); beta *= 1 + e * n / horizon, n = 64, horizon 10000.
        KL = 12:  e = 0.2 (clipped from 1)   beta = 0.1 * 1.00128 = 0.100128
        KL = 6.6: e = 0.1                     beta = 0.100128 * 1.00064
        KL = 0:   e = -0.2 (clipped from -1)  beta *= 0.99872
    """
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 64)
    assert ctl.value == pytest.approx(0.100128, rel=1e-12)
    ctl.update(6.6, 64)
    assert ctl.value == pytest.approx(0.100128 * 1.00064, rel=1e-12)
    ctl.update(0.0, 64)
    assert ctl.value == pytest.approx(0.100128 * 1.00064 * 0.99872, rel=1e-12)
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --------------------------------------------------------------------------- registry, YAML, settings


def test_ppo_is_registered_and_its_yaml_lists_exactly_its_hyper_parameters():
    spec = get_loss("ppo")
    assert (spec.needs_reference, spec.needs_rewards, spec.listwise, spec.min_responses) == (True, True, False, 1)
    assert (spec.stage, spec.data, spec.per_token) == ("ppo", "prompts", True)
    config = yaml.safe_load(LOSS_CONF.read_text())
    assert config.pop("name") == "ppo"
    assert config == spec.hparams == {"clip_range": 0.2, "clip_range_value": 0.2, "vf_coef": 0.1}
    check_hparams("ppo", config)


def test_the_ppo_section_lists_exactly_the_stage_settings():
    """conf/ppo/default.yaml (less its judge default) and PPOArgs: one list of names and defaults."""
    config = yaml.safe_load(PPO_CONF.read_text())
    assert config.pop("defaults") == [{"/judge@judge": "auto"}]
    fields = {f.name: f.default for f in dataclasses.fields(PPOArgs) if f.name != "judge"}
    assert config == fields
    assert from_mapping(PPOArgs, config, "ppo") == PPOArgs()


def test_other_losses_declare_their_stage_and_data():
    assert (get_loss("reward").stage, get_loss("dpo").stage, get_loss("sft").stage) == \
        ("reward_model", "preference", "preference")
    assert (get_loss("sft").data, get_loss("preferred_ft").data, get_loss("dpo").data) == \
        ("demonstrations", "best", "rankings")
    assert get_loss("preferred_ft").fn is get_loss("sft").fn and not get_loss("dpo").per_token
    with pytest.raises(ValueError, match="register_loss\\('mine'\\): data must be one of rankings, best"):
        register_loss("mine", needs_reference=False, data="pairs")


@pytest.mark.parametrize("overrides, message", [
    ({"kl_coef": -0.1}, "ppo.kl_coef must be >= 0"),
    ({"lam": 1.5}, "ppo.lam must be <= 1"),
    ({"ppo_epochs": 0}, "ppo.ppo_epochs must be >= 1"),
    ({"n_minibatches": 128}, "ppo.n_minibatches must be <= ppo.rollout_batch_size"),
    ({"value_model": "shared"}, "ppo.value_model must be one of head, critic"),
    ({"whiten_advantages": 1}, "ppo.whiten_advantages must be true or false"),
    ({"resume_from": "/nonexistent/ppo-last.pt"}, "ppo.resume_from=/nonexistent/ppo-last.pt: no such"),
    ({"max_kl": float("inf")}, "ppo.max_kl must be a number"),
    ({"temperature": 0}, "ppo.temperature must be > 0"),
])
def test_ppo_args_name_the_bad_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PPOArgs(**overrides)


@pytest.mark.parametrize("hparams, message", [
    ({"clip_range": 0}, "loss.clip_range must be > 0"),
    ({"clip_range_value": -0.1}, "loss.clip_range_value must be > 0"),
    ({"vf_coef": -1}, "loss.vf_coef must be >= 0"),
    ({"kl_coef": 0.1}, "loss.kl_coef is not a hyper-parameter of loss 'ppo'"),
])
def test_ppo_loss_hyper_parameters_name_the_bad_key(hparams, message):
    with pytest.raises(ValueError, match=message):
        check_hparams("ppo", hparams)


def test_ppo_args_reject_unknown_keys():
    with pytest.raises(ConfigError, match="ppo.clip_range: unknown key"):
        from_mapping(PPOArgs, {"clip_range": 0.2}, "ppo")
