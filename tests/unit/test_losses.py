"""Unit tests of the preference losses against hand-worked values, plus invariants and the registry.

Conventions: tensors are (B, n), column 0 the best response, summed log-probs. Useful values:
-log sigmoid(x) = log(1 + e^{-x}), so -log sigmoid(0) = log 2 = 0.693147,
-log sigmoid(ln 3) = log(1 + 1/3) = log(4/3) = 0.287682, -log sigmoid(-ln 3) = log 4 = 1.386294,
log(1 + e^{-1}) = 0.313262, log(1 + e^{-2}) = 0.126928.
"""

from __future__ import annotations

import importlib
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from alignexp.losses import check_hparams, get_loss, registered_losses
from alignexp.losses.registry import HPARAM_CONSTRAINTS, SWEEP_SHARED_HPARAMS, loss_kwargs

LN2, LN3 = math.log(2), math.log(3)
CONF = Path(__file__).resolve().parents[2] / "conf" / "loss"


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- registry


EXPECTED = {  # name: (needs_reference, needs_rewards, listwise, min_responses, uses_scores)
    "dpo": (True, False, False, 2, False), "cdpo": (True, False, False, 2, False),
    "ipo": (True, False, False, 2, False), "hinge": (True, False, False, 2, False),
    "slic": (False, False, False, 2, False), "rrhf": (False, False, True, 2, True),
    "pro": (False, False, True, 2, True), "ranked_dpo": (True, False, True, 2, True),
    "lipo": (True, False, True, 2, True), "reward": (False, False, True, 2, True),
    "sft": (False, False, False, 1, False), "preferred_ft": (False, False, False, 1, False),
    "raft": (False, False, False, 1, False), "ppo": (True, True, False, 1, False),
    "simpo": (False, False, False, 2, False), "ranked_simpo": (False, False, True, 2, True),
    "cpo": (False, False, False, 2, False), "orpo": (False, False, False, 2, False),
    "rpo": (True, False, False, 2, False), "kto": (True, True, False, 1, False),
    "apo_zero": (True, False, False, 2, False), "apo_down": (True, False, False, 2, False),
    "nca": (True, False, False, 2, False), "exo": (True, False, False, 2, False),
    "robust": (True, False, False, 2, False), "bco": (True, False, False, 2, False),
    "sppo_hard": (True, False, False, 2, False), "discopop": (True, False, False, 2, False),
    "aot": (True, False, False, 2, False), "mix": (True, False, False, 2, False),
}


def test_every_loss_is_registered_with_what_it_needs():
    assert set(EXPECTED) == set(registered_losses())
    for name, flags in EXPECTED.items():
        spec = get_loss(name)
        assert (spec.needs_reference, spec.needs_rewards, spec.listwise, spec.min_responses,
                spec.uses_scores) == flags, name


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "slic", "rrhf", "pro", "ranked_dpo", "lipo", "simpo",
                                  "ranked_simpo", "cpo", "orpo", "rpo", "kto", "apo_zero", "apo_down", "nca", "exo",
                                  "robust", "bco", "sppo_hard", "discopop", "aot", "mix"])
def test_each_loss_documents_its_equation_and_source(name):
    fn = get_loss(name).fn
    doc = (fn.__doc__ or "") + (importlib.import_module(fn.__module__).__doc__ or "")
    assert re.search(r"\bL +=", doc), f"{name}: write the equation in the docstring"
    assert re.search(r"et al\. 20\d\d|Rafailov", doc), f"{name}: cite the paper"


def test_unknown_loss_lists_the_registered_names():
    with pytest.raises(KeyError, match="ranked_dpo"):
        get_loss("nope")


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"raft", "reward", "ppo"}))  # their YAMLs hold more
def test_yaml_keys_are_the_function_hparams_and_valid(name):
    """conf/loss/<name>.yaml names the loss and lists exactly its keyword-only hyper-parameters."""
    config = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert config.pop("name") == name
    shared = {k for k in SWEEP_SHARED_HPARAMS if k in config and k not in get_loss(name).hparams}
    assert all(config.pop(k) is None for k in shared)  # declared for cross-loss sweeps, null
    assert set(config) == set(get_loss(name).hparams)
    check_hparams(name, config)
    if name != "mix":  # a mix has no default terms: its YAML gives them
        check_hparams(name, get_loss(name).hparams)  # the defaults are valid too


@pytest.mark.parametrize("name, hparams, message", [
    ("dpo", {"beta": -1}, "loss.beta must be > 0, got -1"),
    ("dpo", {"beta": 0}, "loss.beta must be > 0, got 0"),
    ("cdpo", {"label_smoothing": 0.5}, r"loss.label_smoothing must be in \[0, 0.5\), got 0.5"),
    ("dpo", {"label_smoothing": -0.1}, "loss.label_smoothing must be in"),
    ("slic", {"margin": -1.0}, "loss.margin must be >= 0, got -1.0"),
    ("slic", {"sft_weight": -0.1}, "loss.sft_weight must be >= 0"),
    ("pro", {"sft_weight": -1}, "loss.sft_weight must be >= 0"),
    ("ranked_dpo", {"sft_weight": -1}, "loss.sft_weight must be >= 0"),
    ("rrhf", {"rank_weight": -2}, "loss.rank_weight must be >= 0"),
    ("dpo", {"margin": 1.0}, "loss.margin is not a hyper-parameter of loss 'dpo'"),
    ("dpo", {"bet": 0.1}, "loss.bet is not a hyper-parameter of loss 'dpo' .*beta, f_alpha, f_divergence, label_smoothing"),
    ("sft", {"margin": 0.1}, "loss.margin is not a hyper-parameter of loss 'sft'"),
    ("dpo", {"target_logps": 1.0}, "loss.target_logps is not a hyper-parameter"),
    ("dpo", {"beta": "0.1"}, "loss.beta must be a number, got '0.1'"),
    ("dpo", {"beta": True}, "loss.beta must be a number, got True"),
    ("dpo", {"beta": float("inf")}, "loss.beta must be finite"),
    ("ipo", {"length_normalize": 1}, "loss.length_normalize must be true or false, got 1"),
    ("nope", {}, "loss.name: unknown loss 'nope'"),
])
def test_check_hparams_names_the_key(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        check_hparams(name, hparams)


def test_check_hparams_accepts_good_values_and_ignores_name():
    check_hparams("dpo", {"name": "dpo", "beta": 1, "label_smoothing": 0.0})
    check_hparams("cdpo", {"label_smoothing": 0.49})
    check_hparams("ipo", {"beta": 0.01, "length_normalize": True})
    check_hparams("slic", {"margin": 0, "sft_weight": 0})
    assert {"beta", "label_smoothing", "margin", "sft_weight", "rank_weight"} <= set(HPARAM_CONSTRAINTS)


# --------------------------------------------------------------------------- DPO / cDPO


def test_dpo_hand_worked():
    """beta = 1, reference all zeros.

    Row 0: lp = (-1, -1 - ln 3): h = -1 - (-1 - ln 3) = ln 3, loss = log(1 + e^{-ln 3}) = log(4/3) = 0.287682.
    Row 1: lp = (-2, -2): h = 0, loss = log 2 = 0.693147.
    Mean = (log(4/3) + log 2) / 2 = log(8/3) / 2 = 0.490415.
    Rewards (beta * log-ratio): chosen mean (-1 - 2)/2 = -1.5, rejected mean (-1 - ln 3 - 2)/2 = -2.049306,
    margin mean ln 3 / 2 = 0.549306, accuracy 1/2 (row 1 ties, and a tie is not a win).
    """
    lp, lr = t([[-1.0, -1.0 - LN3], [-2.0, -2.0]]), t([[0.0, 0.0], [0.0, 0.0]])
    out = get_loss("dpo")(lp, lr, beta=1.0)
    close(out.loss, math.log(8 / 3) / 2)
    close(out.metrics["rewards/chosen"], -1.5)
    close(out.metrics["rewards/rejected"], (-3 - LN3) / 2)
    close(out.metrics["rewards/margin"], LN3 / 2)
    close(out.metrics["rewards/accuracy"], 0.5)


def test_dpo_beta_scales_the_logit():
    """beta = 0.5 and h = 2 ln 3 give beta h = ln 3 again: loss log(4/3) = 0.287682.
    lp = (-3, -5), lr = (-3 - ln 3, -5 + ln 3): lp - lr = (ln 3, -ln 3), h = 2 ln 3."""
    lp, lr = t([[-3.0, -5.0]]), t([[-3.0 - LN3, -5.0 + LN3]])
    close(get_loss("dpo")(lp, lr, beta=0.5).loss, math.log(4 / 3))


def test_cdpo_hand_worked():
    """eps = 0.1, beta h = ln 3 (the row 0 of the DPO test):
    L = 0.9 * log(1 + e^{-ln 3}) + 0.1 * log(1 + e^{ln 3}) = 0.9 * log(4/3) + 0.1 * log 4
      = 0.9 * 0.287682 + 0.1 * 1.386294 = 0.258914 + 0.138629 = 0.397543.
    The cdpo alias is the same function, with the YAML's label_smoothing."""
    lp, lr = t([[-1.0, -1.0 - LN3]]), t([[0.0, 0.0]])
    expected = 0.9 * math.log(4 / 3) + 0.1 * math.log(4)
    close(get_loss("cdpo")(lp, lr, beta=1.0, label_smoothing=0.1).loss, expected)
    close(get_loss("dpo")(lp, lr, beta=1.0, label_smoothing=0.1).loss, expected)
    assert abs(expected - 0.397543) < 1e-6
    # eps = 0.5 gives (log(4/3) + log 4) / 2 = log(16/3) / 2 whichever response is chosen: the label
    # carries no information any more, which is why check_hparams requires eps < 0.5.
    close(get_loss("dpo")(lp, lr, beta=1.0, label_smoothing=0.5).loss, math.log(16 / 3) / 2)


# --------------------------------------------------------------------------- IPO


def test_ipo_hand_worked():
    """beta = 0.5, so the target margin is 1 / (2 beta) = 1.
    Row 0: lp = (-3, -5), lr = (-4, -4): log-ratios (1, -1), h = 2, loss (2 - 1)^2 = 1.
    Row 1: lp = (-4, -4.5), lr = (-4, -4): log-ratios (0, -0.5), h = 0.5, loss (0.5 - 1)^2 = 0.25.
    Mean 0.625. Metric logits/margin = mean h = 1.25; rewards/chosen = 0.5 * mean(1, 0) = 0.25."""
    lp, lr = t([[-3.0, -5.0], [-4.0, -4.5]]), t([[-4.0, -4.0], [-4.0, -4.0]])
    out = get_loss("ipo")(lp, lr, beta=0.5)
    close(out.loss, 0.625)
    close(out.metrics["logits/margin"], 1.25)
    close(out.metrics["rewards/chosen"], 0.25)


def test_ipo_length_normalized_hand_worked():
    """Same rows, lengths ((2, 4), (1, 5)), length_normalize = true.
    Row 0: log-ratios (1/2, -1/4), h = 0.75, loss (0.75 - 1)^2 = 0.0625.
    Row 1: log-ratios (0/1, -0.5/5) = (0, -0.1), h = 0.1, loss (0.1 - 1)^2 = 0.81.
    Mean 0.43625. Without lengths it is an error."""
    lp, lr = t([[-3.0, -5.0], [-4.0, -4.5]]), t([[-4.0, -4.0], [-4.0, -4.0]])
    lengths = torch.tensor([[2, 4], [1, 5]])
    close(get_loss("ipo")(lp, lr, lengths, beta=0.5, length_normalize=True).loss, 0.43625)
    with pytest.raises(ValueError, match="lengths"):
        get_loss("ipo")(lp, lr, beta=0.5, length_normalize=True)


# --------------------------------------------------------------------------- hinge (RSO)


def test_hinge_hand_worked():
    """beta = 0.5, L = max(0, 1 - 0.5 h), reference zeros.
    Row 0: h = -3 - (-7) = 4 -> max(0, 1 - 2) = 0.
    Row 1: h = -3 - (-4) = 1 -> 1 - 0.5 = 0.5.
    Row 2: h = -5 - (-3) = -2 -> 1 + 1 = 2.
    Mean (0 + 0.5 + 2) / 3 = 0.833333; accuracy 2/3."""
    lp = t([[-3.0, -7.0], [-3.0, -4.0], [-5.0, -3.0]])
    out = get_loss("hinge")(lp, torch.zeros_like(lp), beta=0.5)
    close(out.loss, 2.5 / 3)
    close(out.metrics["rewards/accuracy"], 2 / 3)


# --------------------------------------------------------------------------- SLiC-HF


def test_slic_hand_worked():
    """margin = 1, sft_weight = 0.5, no reference.
    Row 0: lp = (-3, -3.5): rank = max(0, 1 + 3 - 3.5) = 0.5; sft = -0.5 * (-3) = 1.5; total 2.0.
    Row 1: lp = (-2, -5): rank = max(0, 1 + 2 - 5) = 0; sft = -0.5 * (-2) = 1.0; total 1.0.
    Mean 1.5; loss/rank = 0.25, loss/sft = 1.25.
    With targets (-2, -4) instead of y0: sft = (1.0, 2.0): totals (1.5, 2.0), mean 1.75."""
    lp = t([[-3.0, -3.5], [-2.0, -5.0]])
    out = get_loss("slic")(lp, margin=1.0, sft_weight=0.5)
    close(out.loss, 1.5)
    close(out.metrics["loss/rank"], 0.25)
    close(out.metrics["loss/sft"], 1.25)
    close(get_loss("slic")(lp, margin=1.0, sft_weight=0.5, target_logps=t([-2.0, -4.0])).loss, 1.75)


# --------------------------------------------------------------------------- RRHF


def test_rrhf_hand_worked():
    """lp = (-4, -4, -5), lengths (2, 4, 5): p = lp / |y| = (-2, -1, -1); rewards (3, 2, 1).
    Pairs with r_i < r_j: (1 < 0): max(0, p1 - p0) = max(0, -1 + 2) = 1;
    (2 < 0): max(0, p2 - p0) = 1; (2 < 1): max(0, p2 - p1) = 0. rank = 2.
    y_best = argmax r = column 0, summed: -lp0 = 4. L = 1 * 2 + 4 = 6; with rank_weight 0.5: 1 + 4 = 5.
    Without rewards the ranking order (2, 1, 0) gives the same pairs: 6 again."""
    lp, lengths, r = t([[-4.0, -4.0, -5.0]]), torch.tensor([[2, 4, 5]]), t([[3.0, 2.0, 1.0]])
    rrhf = get_loss("rrhf")
    out = rrhf(lp, lengths=lengths, rewards=r)
    close(out.loss, 6.0)
    close(out.metrics["loss/rank"], 2.0)
    close(out.metrics["loss/sft"], 4.0)
    close(rrhf(lp, lengths=lengths, rewards=r, rank_weight=0.5).loss, 5.0)
    close(rrhf(lp, lengths=lengths).loss, 6.0)


def test_rrhf_ties_make_no_pair_and_best_is_first_argmax():
    """Rewards (3, 3, 1): the tie (0, 1) makes no pair, so rank = [2 < 0] 1 + [2 < 1] 0 = 1;
    y_best is the first of the tied best, column 0: L = 1 + 4 = 5.
    Rewards (1, 3, 2) (not sorted): y_best = column 1, -lp1 = 4; pairs (0<1): max(0, -2 + 1) = 0,
    (0<2): max(0, -2 + 1) = 0, (2<1): max(0, -1 + 1) = 0; L = 4.
    Lengths are the true lengths: doubling |y2| to 10 makes p2 = -0.5 and rank (2<0) = 1.5, (2<1) = 0.5:
    with rewards (3, 2, 1): L = 1 + 1.5 + 0.5 + 4 = 7."""
    lp, lengths = t([[-4.0, -4.0, -5.0]]), torch.tensor([[2, 4, 5]])
    rrhf = get_loss("rrhf")
    close(rrhf(lp, lengths=lengths, rewards=t([[3.0, 3.0, 1.0]])).loss, 5.0)
    close(rrhf(lp, lengths=lengths, rewards=t([[1.0, 3.0, 2.0]])).loss, 4.0)
    close(rrhf(lp, lengths=torch.tensor([[2, 4, 10]]), rewards=t([[3.0, 2.0, 1.0]])).loss, 7.0)


# --------------------------------------------------------------------------- PRO


def test_pro_without_rewards_hand_worked():
    """All temperatures 1. lengths (2, 1, 1), lp = (-2, -1 - ln 3, -1 - ln 3): s = (-1, -1 - ln 3, -1 - ln 3).
    The rank terms only depend on differences (eps = 1e-10 is ~1e-10 relative here), so shift by +1:
    k = 0: log(1 + 1/3 + 1/3) - 0 = log(5/3) = 0.510826;
    k = 1: log(1/3 + 1/3) - log(1/3) = log 2 = 0.693147.   rank = log(10/3) = 1.203973.
    sft = 0.05 * (3 - 1)^2 * (-lp0) = 0.05 * 4 * 2 = 0.4.   L = 1.603973."""
    lp, lengths = t([[-2.0, -1.0 - LN3, -1.0 - LN3]]), torch.tensor([[2, 1, 1]])
    out = get_loss("pro")(lp, lengths=lengths)
    torch.testing.assert_close(out.loss, t(math.log(10 / 3) + 0.4), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out.metrics["loss/rank"], t(math.log(10 / 3)), rtol=1e-8, atol=1e-8)
    close(out.metrics["loss/sft"], 0.4)


def test_pro_reward_temperatures_hand_worked():
    """n = 2, rewards (2, 0): 1/T_0^1 = 2 - 0 = 2, 1/T_0^0 = max(2) = 2.
    lengths (1, 1), lp = (0, -ln 3 / 2): L_0 = log(e^{2*0} + e^{2*(-ln 3/2)}) - 0 = log(1 + 1/3) = 0.287682.
    sft_weight 0: L = log(4/3).

    n = 3, rewards (3, 2, 0), lengths 1, s = lp = (0, 0, -ln 3 / 2):
    k = 0: 1/T = (3-2, 3-0) = (1, 3), 1/T_0^0 = 3: log(e^0 + e^{1*0} + e^{3*(-ln 3/2)}) - 0
           = log(2 + 3^{-3/2}) = log(2.192450) = 0.785020;
    k = 1: 1/T_1^2 = 2, 1/T_1^1 = 2: log(e^0 + e^{2*(-ln 3/2)}) - 0 = log(4/3) = 0.287682.
    rank = 1.072702; sft = 0.05 * 4 * (-0) = 0."""
    pro = get_loss("pro")
    out = pro(t([[0.0, -LN3 / 2]]), lengths=torch.tensor([[1, 1]]), rewards=t([[2.0, 0.0]]), sft_weight=0.0)
    close(out.loss, math.log(4 / 3))
    out = pro(t([[0.0, 0.0, -LN3 / 2]]), lengths=torch.ones(1, 3, dtype=torch.long), rewards=t([[3.0, 2.0, 0.0]]))
    close(out.loss, math.log(2 + 3 ** -1.5) + math.log(4 / 3))
    assert abs(out.loss.item() - 1.072702) < 1e-6


def test_pro_eps_is_inside_the_log():
    """With every s/T far below log(1e-10) = -23.03, eps dominates, exactly as in the authors' code:
    s = (-50, -50), lengths 1, no rewards: log(1e-10 + 2 e^{-50}) + 50 = log(1e-10 e^{50} + 2) = 26.3..."""
    out = get_loss("pro")(t([[-50.0, -50.0]]), lengths=torch.ones(1, 2, dtype=torch.long), sft_weight=0.0)
    close(out.loss, math.log(1e-10 * math.exp(50) + 2))


# --------------------------------------------------------------------------- ranked DPO


def test_ranked_dpo_hand_worked():
    """beta = 0.5, lp = (-1, -2, -3), lr = (-1 - 2 ln 4, -2 - 2 ln 2, -3): u = 0.5 (lp - lr) = (ln 4, ln 2, 0).
    k = 1: -[ln 4 - log(4 + 2 + 1)] = log(7/4);  k = 2: -[ln 2 - log(2 + 1)] = log(3/2).
    L = log(7/4 * 3/2) = log(21/8) = 0.965081. With sft_weight 0.1: + 0.1 * 1 = 1.065081.
    rewards/chosen = ln 4, rewards/rejected = (ln 2 + 0)/2, accuracy 1 (u is in the ranking's order)."""
    lp = t([[-1.0, -2.0, -3.0]])
    lr = t([[-1.0 - 2 * math.log(4), -2.0 - 2 * LN2, -3.0]])
    out = get_loss("ranked_dpo")(lp, lr, beta=0.5)
    close(out.loss, math.log(21 / 8))
    close(out.metrics["rewards/chosen"], math.log(4))
    close(out.metrics["rewards/rejected"], LN2 / 2)
    close(out.metrics["rewards/accuracy"], 1.0)
    close(get_loss("ranked_dpo")(lp, lr, beta=0.5, sft_weight=0.1).loss, math.log(21 / 8) + 0.1)


def test_ranked_dpo_equals_dpo_for_pairs():
    """For n = 2 the Plackett-Luce likelihood is the Bradley-Terry one: -log sigmoid(u0 - u1) = DPO.
    Values, gradients and the shared metrics agree on random tensors."""
    gen = torch.Generator().manual_seed(0)
    lp = (-torch.rand(16, 2, generator=gen) * 50).requires_grad_()
    lr = -torch.rand(16, 2, generator=gen) * 50
    for beta in (0.01, 0.1, 1.0):
        ranked = get_loss("ranked_dpo")(lp, lr, beta=beta)
        dpo = get_loss("dpo")(lp, lr, beta=beta)
        torch.testing.assert_close(ranked.loss, dpo.loss)
        torch.testing.assert_close(torch.autograd.grad(ranked.loss, lp)[0], torch.autograd.grad(dpo.loss, lp)[0])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            torch.testing.assert_close(ranked.metrics[key], dpo.metrics[key])


def test_ranked_dpo_is_a_distribution_over_orders():
    """exp(-L) is the Plackett-Luce probability of the order given by the columns: over all 4! = 24
    orders of 4 responses it sums to 1."""
    gen = torch.Generator().manual_seed(1)
    lp, lr = -torch.rand(1, 4, generator=gen, dtype=torch.float64) * 10, torch.zeros(1, 4, dtype=torch.float64)
    total = sum(torch.exp(-get_loss("ranked_dpo")(lp[:, list(order)], lr, beta=1.0).loss)
                for order in itertools.permutations(range(4)))
    close(total, 1.0)


# --------------------------------------------------------------------------- LiPO-lambda


def test_lipo_hand_worked():
    """beta = 1, reference zeros, s = (2, 1, 0), no scores: positions (2, 1, 0) normalised per list to
    psi = (1, 0.5, 0), G = 2^psi - 1 = (1, sqrt 2 - 1, 0) = (1, 0.414214, 0).
    Ranks by s: (1, 2, 3); 1/D = 1/log2(1 + tau) = (1, 1/log2 3 = 0.630930, 1/2).
    Delta_01 = (1 - 0.414214)(1 - 0.630930) = 0.585786 * 0.369070 = 0.216196;  Delta_02 = 1 * 0.5 = 0.5;
    Delta_12 = 0.414214 * 0.130930 = 0.054233.
    Pair losses log(1 + e^{-(s_i - s_j)}): (0,1) 0.313262, (0,2) 0.126928, (1,2) 0.313262.
    L = 0.216196 * 0.313262 + 0.5 * 0.126928 + 0.054233 * 0.313262 = 0.067726 + 0.063464 + 0.016989 = 0.148179.
    Scores (2, 1, 0), (20, 10, 0) and (0.2, 0.1, 0) normalise to the same psi: the same loss."""
    s = t([[2.0, 1.0, 0.0]])
    lipo = get_loss("lipo")
    out = lipo(s, torch.zeros_like(s), beta=1.0)
    inv, g1 = 1 / math.log2(3), math.sqrt(2) - 1
    sp1, sp2 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))
    expected = (1 - g1) * (1 - inv) * sp1 + 0.5 * sp2 + g1 * (inv - 0.5) * sp1
    close(out.loss, expected)
    assert abs(expected - 0.148179) < 1e-6
    for scores in ([2.0, 1.0, 0.0], [20.0, 10.0, 0.0], [0.2, 0.1, 0.0]):
        close(lipo(s, torch.zeros_like(s), rewards=t([scores]), beta=1.0).loss, expected)
    close(out.metrics["rewards/accuracy"], 1.0)


def test_lipo_labels_are_normalised_per_list():
    """psi = (v - min) / (max - min) per list: scores (0.2, 0.15, 0) give psi (1, 0.75, 0),
    G = (1, 2^0.75 - 1 = 0.681793, 0); with s = (2, 1, 0) as above:
    L = (1 - 0.681793)(1 - 0.630930) sp1 + 0.5 sp2 + 0.681793 (0.630930 - 0.5) sp1
      = 0.117442 * 0.313262 + 0.063464 + 0.089268 * 0.313262 = 0.036790 + 0.063464 + 0.027964 = 0.128218.
    A masked slot (garbage score NaN) does not enter the min or max."""
    from alignexp.losses.lipo import list_normalised

    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, False, False]])
    psi = list_normalised(t([[3.0, 2.5, -1.0, float("nan")], [3.0, 2.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]]), mask)
    torch.testing.assert_close(psi, t([[1.0, 0.875, 0.0, 0.0], [1.0, 2 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    s = t([[2.0, 1.0, 0.0]])
    inv, g1 = 1 / math.log2(3), 2 ** 0.75 - 1
    sp1, sp2 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))
    expected = (1 - g1) * (1 - inv) * sp1 + 0.5 * sp2 + g1 * (inv - 0.5) * sp1
    assert abs(expected - 0.128218) < 1e-6
    close(get_loss("lipo")(s, torch.zeros_like(s), rewards=t([[0.2, 0.15, 0.0]]), beta=1.0).loss, expected)


def test_lipo_of_a_pair_is_dpo_scaled_by_one_dcg_weight_whatever_the_score_scale():
    """n = 2: psi = (1, 0) for any two distinct scores, G = (1, 0), ranks (1, 2) or (2, 1), so
    Delta = |1 - 1/log2 3| = 0.369070 and LiPO = 0.369070 * DPO, for scores in [-1, 1] as for ratings
    1..10. (Before per-list normalisation, scores (0.3, -0.2) gave G = (0.231144, -0.129449), i.e.
    Delta = 0.360593 * 0.369070 = 0.133: a loss about 7x smaller than DPO's at the same beta.)"""
    gen = torch.Generator().manual_seed(0)
    lp, lr = -torch.rand(8, 2, generator=gen, dtype=torch.float64) * 20, -torch.rand(8, 2, generator=gen, dtype=torch.float64) * 20
    dpo = get_loss("dpo")(lp, lr, beta=0.1).loss
    for scores in ([0.3, -0.2], [9.0, 2.0], [1e-3, 0.0]):
        lipo = get_loss("lipo")(lp, lr, rewards=t([scores] * 8), beta=0.1).loss
        torch.testing.assert_close(lipo, (1 - 1 / math.log2(3)) * dpo)


def test_lipo_ranks_come_from_the_current_scores():
    """s = (0, 1, 2) is the reverse of the labels, psi = (1, 0.5, 0), G = (1, 0.414214, 0):
    ranks tau = (3, 2, 1), 1/D = (1/2, 0.630930, 1).
    Delta_01 = 0.585786 * 0.130930 = 0.076697, Delta_02 = 1 * 0.5, Delta_12 = 0.414214 * 0.369070 = 0.152874.
    Pair losses log(1 + e^{-(s_i - s_j)}): (0,1) log(1 + e) = 1.313262, (0,2) log(1 + e^2) = 2.126928, (1,2) 1.313262.
    L = 0.100723 + 1.063464 + 0.200765 = 1.364952; accuracy 0.
    Tied scores (1, 1, 0) make no (0, 1) pair: with s = (2, 1, 0), psi = G = (1, 1, 0):
    L = Delta_02 sp2 + Delta_12 sp1 = 1 * 0.5 * 0.126928 + 1 * 0.130930 * 0.313262 = 0.104479."""
    s = t([[0.0, 1.0, 2.0]])
    out = get_loss("lipo")(s, torch.zeros_like(s), beta=1.0)
    inv, g1 = 1 / math.log2(3), math.sqrt(2) - 1
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731
    close(out.loss, (1 - g1) * (inv - 0.5) * sp(-1) + 0.5 * sp(-2) + g1 * (1 - inv) * sp(-1))
    assert abs(out.loss.item() - 1.364952) < 1e-5
    close(out.metrics["rewards/accuracy"], 0.0)
    s = t([[2.0, 1.0, 0.0]])
    tied = get_loss("lipo")(s, torch.zeros_like(s), rewards=t([[1.0, 1.0, 0.0]]), beta=1.0)
    close(tied.loss, 0.5 * sp(2) + (inv - 0.5) * sp(1))
    assert abs(tied.loss.item() - 0.104479) < 1e-6


# --------------------------------------------------------------------------- invariants for every loss

ALL = ["dpo", "cdpo", "ipo", "hinge", "slic", "rrhf", "pro", "ranked_dpo", "lipo"]
PAIRWISE = [name for name in ALL if not get_loss(name).listwise]
HPARAMS = {"cdpo": {"label_smoothing": 0.1}, "ipo": {"length_normalize": True}, "ranked_dpo": {"sft_weight": 0.1}}


def random_batch(b: int, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, n, generator=gen, dtype=torch.float64) * 20 - 1
    lr = -torch.rand(b, n, generator=gen, dtype=torch.float64) * 20 - 1
    lengths = torch.randint(1, 10, (b, n), generator=gen)
    rewards = torch.sort(torch.randn(b, n, generator=gen, dtype=torch.float64), dim=1, descending=True).values
    return lp, lr, lengths, rewards


def call(name, lp, lr, lengths, rewards, mask=None, **extra):
    return get_loss(name)(lp, lr, lengths, rewards, mask, **HPARAMS.get(name, {}), **extra)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("with_rewards", [False, True])
def test_masked_slot_equals_the_shorter_list_alone(name, with_rewards):
    """Row 1 has 2 responses in a batch of n = 3: its third slot is masked and holds garbage (log-prob 123,
    length 0, reward NaN). The batch loss must equal the mean of row 0 alone (n = 3) and row 1 alone with
    its list of 2, and every gradient must be finite (the garbage never reaches the backward pass)."""
    lp, lr, lengths, rewards = random_batch(2, 3, seed=2)
    lp[1, 2], lr[1, 2], lengths[1, 2], rewards[1, 2] = 123.0, -7.0, 0, float("nan")
    mask = torch.tensor([[True, True, True], [True, True, False]])
    lp.requires_grad_()
    r = rewards if with_rewards else None
    batch = call(name, lp, lr, lengths, r, mask)
    row0 = call(name, lp[:1], lr[:1], lengths[:1], None if r is None else r[:1])
    row1 = call(name, lp[1:, :2], lr[1:, :2], lengths[1:, :2], None if r is None else r[1:, :2])
    torch.testing.assert_close(batch.loss, (row0.loss + row1.loss) / 2)
    (grad,) = torch.autograd.grad(batch.loss, lp)
    assert torch.isfinite(grad).all() and grad[1, 2] == 0
    assert batch.loss.dim() == 0 and all(v.dim() == 0 and torch.isfinite(v) for v in batch.metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_rows_without_a_pair_are_left_out(name):
    """A row with a single response (slot 1 masked) has nothing to compare: the batch loss is that of the
    other rows, for pairwise and listwise losses alike."""
    lp, lr, lengths, rewards = random_batch(3, 2, seed=3)
    lp[2, 1], rewards[2, 1] = 55.0, float("nan")
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    torch.testing.assert_close(call(name, lp, lr, lengths, rewards, mask).loss,
                               call(name, lp[:2], lr[:2], lengths[:2], rewards[:2]).loss)


@pytest.mark.parametrize("name", [n for n in ALL if get_loss(n).needs_reference])
def test_reference_losses_require_reference(name):
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="reference"):
        get_loss(name)(lp)


@pytest.mark.parametrize("name", ["rrhf", "pro"])
def test_length_normalised_losses_require_lengths(name):
    with pytest.raises(ValueError, match="lengths"):
        get_loss(name)(torch.zeros(1, 2))


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_read_the_first_two_columns(name):
    """A pairwise loss given n = 3 uses (column 0, column 1); pairs_for_loss gives it n = 2 anyway."""
    lp, lr, lengths, rewards = random_batch(4, 3, seed=4)
    torch.testing.assert_close(call(name, lp, lr, lengths, rewards).loss,
                               call(name, lp[:, :2], lr[:, :2], lengths[:, :2], rewards[:, :2]).loss)


@pytest.mark.parametrize("name", ALL)
def test_float32_and_gradients_flow(name):
    """In float32 the loss is a finite scalar with a finite, non-zero gradient."""
    lp, lr, lengths, rewards = random_batch(4, 3, seed=5)
    lp, lr, rewards = lp.float().requires_grad_(), lr.float(), rewards.float()
    out = call(name, lp, lr, lengths, rewards)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------- against the authors' formulations


def test_pro_matches_the_released_code_loop():
    """A transcription of PRO's ``compute_loss`` (process_manager.py): per stage, batch mean of
    log(eps + exp(s_k T_kk) + sum exp(s_i T_ki)) - s_k T_kk, summed over stages, plus
    sft_weight * (n - 1)^2 * mean(-summed logp of the best)."""
    lp, _, lengths, rewards = random_batch(5, 4, seed=6)
    scores = lp / lengths
    expected = 0.0
    for time in range(3):
        neg_t = rewards[:, time].view(-1, 1) - rewards[:, time + 1:]
        pos_t = neg_t.max(dim=1).values
        stage = torch.log(1e-10 + torch.exp(scores[:, time] * pos_t)
                          + torch.exp(scores[:, time + 1:] * neg_t).sum(dim=1)) - scores[:, time] * pos_t
        expected = expected + stage.mean()
    expected = expected + 0.05 * 9 * (-lp[:, 0]).mean()
    torch.testing.assert_close(get_loss("pro")(lp, lengths=lengths, rewards=rewards).loss, expected)


def test_rrhf_matches_the_released_rank_term():
    """RRHF's ``rrhf_loss``: diff[b, i, j] = p_j - p_i, pairs with r_j > r_i and diff < 0 contribute -diff;
    p uses the true lengths. The SFT term is the paper's summed -lp(y_best)."""
    lp, _, lengths, rewards = random_batch(5, 4, seed=7)
    p = lp / lengths
    diff = p.unsqueeze(1) - p.unsqueeze(-1)
    rw_diff = rewards.unsqueeze(1) - rewards.unsqueeze(-1)
    rank = -(diff * ((rw_diff > 0) & (diff < 0))).sum(dim=(1, 2))
    best = rewards.argmax(dim=1)
    expected = (rank - lp.gather(1, best[:, None]).squeeze(1)).mean()
    torch.testing.assert_close(get_loss("rrhf")(lp, lengths=lengths, rewards=rewards).loss, expected)


def test_ranked_dpo_matches_the_plackett_luce_loop():
    """L = -sum_k [u_k - logsumexp(u_k..u_m)], written as a plain loop over k."""
    lp, lr, _, _ = random_batch(5, 4, seed=8)
    u = 0.1 * (lp - lr)
    expected = -sum(u[:, k] - torch.logsumexp(u[:, k:], dim=1) for k in range(3)).mean()
    torch.testing.assert_close(get_loss("ranked_dpo")(lp, lr, beta=0.1).loss, expected)


def test_a_shared_sweep_key_is_ignored_by_a_loss_that_does_not_take_it():
    """`-m loss=dpo,rrhf loss.beta=0.1,0.5`: rrhf has no beta; it is left out of its kwargs and reported."""
    check_hparams("rrhf", {"rank_weight": 1.0, "beta": 0.5})
    kwargs, ignored = loss_kwargs("rrhf", {"name": "rrhf", "rank_weight": 1.0, "beta": 0.5})
    assert kwargs == {"rank_weight": 1.0} and ignored == ["beta"]
    kwargs, ignored = loss_kwargs("dpo", {"name": "dpo", "beta": 0.5, "label_smoothing": 0.0})
    assert kwargs == {"beta": 0.5, "label_smoothing": 0.0} and ignored == []
