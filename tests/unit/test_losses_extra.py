"""Hand-worked values of the losses added beside DPO (SimPO, ranked SimPO, CPO, ORPO, RPO, APO, NCA, EXO,
robust DPO, BCO, SPPO, DiscoPOP, AOT, KTO, mixes) and of DPO's length normalisation and f-divergences.

Conventions as tests/unit/test_losses.py: (B, n) tensors, column 0 the best, summed log-probs; c and r are the
chosen and rejected log-ratios lp - lr, h = c - r. Useful values: -log sigmoid(ln 3) = log(4/3) = 0.287682,
-log sigmoid(-ln 3) = log 4, sigmoid(ln 3) = 3/4, log(1 + e^-1) = 0.313262, log(1 + e^-2) = 0.126928.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignexp.losses import check_hparams, get_loss

LN2, LN3 = math.log(2), math.log(3)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-7, atol=1e-9)


ZERO = t([[0.0, 0.0]])


def pair(c: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair whose log-ratios are (c, r): policy (c - 1, r - 2) against reference (-1, -2)."""
    return t([[c - 1.0, r - 2.0]]), t([[-1.0, -2.0]])


# --------------------------------------------------------------------------- DPO's new options


def test_dpo_length_normalize():
    """lp = (-4, -6), reference 0, lengths (2, 3), beta 1. Per token: -4/2 = -2 and -6/3 = -2, h = 0:
    loss log 2. Without normalisation h = 2: loss log(1 + e^-2) = 0.126928."""
    lp, lengths = t([[-4.0, -6.0]]), torch.tensor([[2, 3]])
    close(get_loss("dpo")(lp, ZERO, lengths, beta=1.0, length_normalize=True).loss, LN2)
    close(get_loss("dpo")(lp, ZERO, lengths, beta=1.0).loss, math.log1p(math.exp(-2)))


@pytest.mark.parametrize("divergence, c, r, f_alpha, expected", [
    # f'(t) = 1 - 1/t: c = ln 2 gives 1 - 1/2 = 1/2, r = -ln 2 gives 1 - 2 = -1; h = 3/2: log(1 + e^-1.5) = 0.201413
    ("forward_kl", LN2, -LN2, 0.5, math.log1p(math.exp(-1.5))),
    # f'(t) = log(2t/(1+t)): c = ln 3 gives log(6/4) = log 1.5, r = 0 gives log 1 = 0; h = log 1.5:
    # log(1 + 1/1.5) = log(5/3) = 0.510826
    ("js_divergence", LN3, 0.0, 0.5, math.log(5 / 3)),
    # f'(t) = (t^-0.5 - 1)/(-0.5) = 2 (1 - t^-0.5): c = ln 4 gives 2 (1 - 1/2) = 1, r = 0 gives 0; h = 1:
    # log(1 + e^-1) = 0.313262
    ("alpha_divergence", math.log(4), 0.0, 0.5, math.log1p(math.exp(-1))),
    # f_alpha = 1 is the limit log t: DPO, h = ln 3: log(4/3)
    ("alpha_divergence", LN3, 0.0, 1.0, math.log(4 / 3)),
    ("reverse_kl", LN3, 0.0, 0.5, math.log(4 / 3)),
])
def test_dpo_f_divergences(divergence, c, r, f_alpha, expected):
    """f-DPO: -log sigmoid(beta (f'(t_c) - f'(t_r))), beta 1, t = pi/pi_ref (working beside each case)."""
    lp, lr = pair(c, r)
    close(get_loss("dpo")(lp, lr, beta=1.0, f_divergence=divergence, f_alpha=f_alpha).loss, expected)


@pytest.mark.parametrize("hparams, message", [
    ({"f_divergence": "kl"}, "loss.f_divergence must be one of reverse_kl, forward_kl"),
    ({"f_divergence": 1}, "loss.f_divergence must be a string"),
    ({"f_alpha": 0.0}, "loss.f_alpha must be > 0"),
])
def test_dpo_new_options_are_checked(hparams, message):
    with pytest.raises(ValueError, match=message):
        check_hparams("dpo", hparams)


# --------------------------------------------------------------------------- SimPO, ranked SimPO


def test_simpo_hand_worked():
    """beta 2, gamma 0.5; lp = (-2, -6), lengths (2, 3): per-token (-1, -2), u = 2 * (-1, -2) = (-2, -4);
    z = u0 - u1 - gamma = 2 - 0.5 = 1.5; loss log(1 + e^-1.5) = 0.201413. Rewards: chosen -2, rejected -4.
    With label_smoothing 0.1: 0.9 * log(1 + e^-1.5) + 0.1 * log(1 + e^1.5) = 0.181272 + 0.170141 = 0.351413."""
    lp, lengths = t([[-2.0, -6.0]]), torch.tensor([[2, 3]])
    out = get_loss("simpo")(lp, lengths=lengths)
    close(out.loss, math.log1p(math.exp(-1.5)))
    close(out.metrics["rewards/chosen"], -2.0)
    close(out.metrics["rewards/rejected"], -4.0)
    smoothed = get_loss("simpo")(lp, lengths=lengths, label_smoothing=0.1).loss
    close(smoothed, 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5)))


def test_ranked_simpo_hand_worked():
    """beta 1, gamma 0.5; lp = (-2, -6, -3), lengths (2, 3, 1): u = (-1, -2, -3).
    Factor 1: y1 against {y2, y3}: logsumexp(-2, -3) = -2 + log(1 + e^-1) = -1.686738;
      -log sigmoid(-1 - 0.5 + 1.686738) = log(1 + e^-0.186738) = 0.604129.
    Factor 2: y2 against y3: -log sigmoid(-2 - 0.5 + 3) = log(1 + e^-0.5) = 0.474077.
    Loss = 1.078206. With scores (1, 1, 0) y1 and y2 tie and are not compared: factor 1 runs over {y3} only,
    -log sigmoid(-1 - 0.5 + 3) = log(1 + e^-1.5) = 0.201413, plus factor 2: 0.675490."""
    lp, lengths = t([[-2.0, -6.0, -3.0]]), torch.tensor([[2, 3, 1]])
    lse = -2 + math.log1p(math.exp(-1))
    f1, f2 = math.log1p(math.exp(-(-1 - 0.5 - lse))), math.log1p(math.exp(-0.5))
    close(get_loss("ranked_simpo")(lp, lengths=lengths, beta=1.0).loss, f1 + f2)
    tied = get_loss("ranked_simpo")(lp, lengths=lengths, rewards=t([[1.0, 1.0, 0.0]]), beta=1.0).loss
    close(tied, math.log1p(math.exp(-1.5)) + f2)


def test_ranked_simpo_is_simpo_at_n_2():
    """Invariant: on pairs ranked SimPO is SimPO (the loss and its gradient)."""
    torch.manual_seed(0)
    lp = (-torch.rand(5, 2, dtype=torch.float64) * 10).requires_grad_()
    lengths = torch.randint(1, 8, (5, 2))
    a = get_loss("ranked_simpo")(lp, lengths=lengths, beta=2.5, gamma=0.7).loss
    (ga,) = torch.autograd.grad(a, lp)
    b = get_loss("simpo")(lp, lengths=lengths, beta=2.5, gamma=0.7).loss
    (gb,) = torch.autograd.grad(b, lp)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


# --------------------------------------------------------------------------- CPO, ORPO, RPO (NLL terms)


def test_cpo_hand_worked():
    """beta 1, alpha 1. Row 0: lp = (-1, -1 - ln 3), lengths (2, 4): -log sigmoid(ln 3) = log(4/3).
    Row 1: lp = (-3, -3), lengths (4, 1): log 2. Preference term: log(8/3)/2 = 0.490415.
    NLL: chosen tokens pooled: (1 + 3) / (2 + 4) = 2/3 (not the mean of per-row means, (1/2 + 3/4)/2).
    Loss 0.490415 + 0.666667 = 1.157082; with alpha 0.5: 0.490415 + 1/3."""
    lp, lengths = t([[-1.0, -1.0 - LN3], [-3.0, -3.0]]), torch.tensor([[2, 4], [4, 1]])
    out = get_loss("cpo")(lp, lengths=lengths, beta=1.0)
    close(out.loss, math.log(8 / 3) / 2 + 2 / 3)
    close(out.metrics["loss/nll"], 2 / 3)
    close(get_loss("cpo")(lp, lengths=lengths, beta=1.0, alpha=0.5).loss, math.log(8 / 3) / 2 + 1 / 3)


def test_orpo_hand_worked():
    """beta 0.5; lengths (2, 3); token means ln(1/2) and ln(1/4), i.e. lp = (-2 ln 2, -6 ln 2).
    odds(y0) = (1/2)/(1/2) = 1, odds(y1) = (1/4)/(3/4) = 1/3: log odds ratio ln 3.
    Odds-ratio term: -0.5 log sigmoid(ln 3) = 0.5 log(4/3) = 0.143841. NLL: 2 ln 2 / 2 = ln 2 = 0.693147.
    Loss 0.836988."""
    lp, lengths = t([[-2 * LN2, -6 * LN2]]), torch.tensor([[2, 3]])
    out = get_loss("orpo")(lp, lengths=lengths, beta=0.5)
    close(out.loss, LN2 + 0.5 * math.log(4 / 3))
    close(out.metrics["log_odds_ratio"], LN3)
    close(out.metrics["loss/nll"], LN2)


def test_rpo_hand_worked():
    """As CPO's rows, with a reference of zeros (so DPO's log-ratios are CPO's log-probs), beta 1, alpha 0.5:
    DPO term log(8/3)/2 = 0.490415, NLL 2/3 pooled: loss 0.490415 + 1/3 = 0.823748."""
    lp, lengths = t([[-1.0, -1.0 - LN3], [-3.0, -3.0]]), torch.tensor([[2, 4], [4, 1]])
    out = get_loss("rpo")(lp, t([[0.0, 0.0], [0.0, 0.0]]), lengths, beta=1.0, alpha=0.5)
    close(out.loss, math.log(8 / 3) / 2 + 1 / 3)
    close(out.metrics["loss/dpo"], math.log(8 / 3) / 2)


# --------------------------------------------------------------------------- TRL's DPO loss types


@pytest.mark.parametrize("name, c, r, hparams, expected", [
    # (1 - sigmoid(ln 3)) + sigmoid(-ln 3) = 1/4 + 1/4
    ("apo_zero", LN3, -LN3, {}, 0.5),
    # sigmoid(ln 3) + 1 - sigmoid(2 ln 3) = 3/4 + 1 - 9/10
    ("apo_down", LN3, -LN3, {}, 0.85),
    # -log sigmoid(ln 3) - 1/2 log sigmoid(-ln 3) - 1/2 log sigmoid(ln 3) = 1.5 log(4/3) + log 2 = 1.124670
    ("nca", LN3, -LN3, {}, 1.5 * math.log(4 / 3) + LN2),
    # eps 0.1, h = ln 3: q = (3/4, 1/4): 3/4 (log(3/4) - log 0.9) + 1/4 (log(1/4) - log 0.1) = 0.092331
    ("exo", LN3, 0.0, {"label_smoothing": 0.1}, 0.75 * math.log(0.75 / 0.9) + 0.25 * math.log(0.25 / 0.1)),
    # eps 0.25, h = ln 3: (0.75 log(4/3) - 0.25 log 4) / 0.5 = (0.215762 - 0.346574) / 0.5 = -0.261624
    ("robust", LN3, 0.0, {"label_smoothing": 0.25}, (0.75 * math.log(4 / 3) - 0.25 * math.log(4)) / 0.5),
    # -log sigmoid(ln 3) - log sigmoid(ln 3) = 2 log(4/3)
    ("bco", LN3, -LN3, {}, 2 * math.log(4 / 3)),
    # beta 0.5: 1/(2 beta) = 1; (2 - 1)^2 + (-3 + 1)^2 = 5
    ("sppo_hard", 2.0, -3.0, {"beta": 0.5}, 5.0),
    # tau 1, h = ln 3: w = sigmoid(ln 3) = 3/4; 1/4 log(4/3) + 3/4 e^-ln3 = 0.071921 + 0.25 = 0.321921
    ("discopop", LN3, 0.0, {"tau": 1.0}, 0.25 * math.log(4 / 3) + 0.25),
])
def test_pairwise_variants_hand_worked(name, c, r, hparams, expected):
    """beta 1 unless given; the working is beside each case."""
    lp, lr = pair(c, r)
    close(get_loss(name)(lp, lr, **{"beta": 1.0, **hparams}).loss, expected)


def test_discopop_at_its_defaults_starts_downhill_towards_the_rejected():
    """DiscoPOP's loss as a function of rho = beta h is not monotone at tau 0.05 (TRL's default): at the
    reference (h = 0) its slope is dL/drho = -5 log 2 - 1/4 + 5 - 1/2 = 0.784264 > 0 (w' = 1/(4 tau) = 5), so
    gradient descent lowers the margin first; a local minimum lies at rho = -0.119 and the barrier at +0.072.
    The study's DiscoPOP runs (experiments/study/README.md) lose gold reward for this reason."""
    h = torch.zeros((), dtype=torch.float64, requires_grad=True)
    lp = torch.stack([h, torch.zeros((), dtype=torch.float64)]).reshape(1, 2)
    get_loss("discopop")(lp, torch.zeros(1, 2, dtype=torch.float64), beta=1.0, tau=0.05).loss.backward()
    close(h.grad, -5 * LN2 - 0.25 + 5 - 0.5)
    rho = torch.linspace(-0.3, 0.3, 6001, dtype=torch.float64)
    losses = torch.stack([get_loss("discopop")(torch.stack([x, torch.zeros_like(x)]).reshape(1, 2),
                                               torch.zeros(1, 2, dtype=torch.float64), beta=1.0).loss for x in rho])
    interior = (losses[1:-1] < losses[:-2]) & (losses[1:-1] < losses[2:])
    assert abs(rho[1:-1][interior].item() - (-0.1186)) < 1e-3


def test_exo_needs_positive_smoothing():
    with pytest.raises(ValueError, match=r"loss.label_smoothing must be in \(0, 0.5\)"):
        check_hparams("exo", {"label_smoothing": 0.0})
    check_hparams("exo", {"label_smoothing": 1e-3})


def test_aot_sorts_over_the_batch():
    """beta 1. Policy margins lp0 - lp1 = (1, -2); reference margins (0.5, 3). Sorted: (-2, 1) and (0.5, 3),
    d = (-2.5, -2): loss (log(1 + e^2.5) + log(1 + e^2)) / 2 = (2.578889 + 2.126928) / 2 = 2.352909.
    (Row by row the margins would be (0.5, -5): a different number.) A third row without a pair is left out."""
    lp = t([[-1.0, -2.0], [-3.0, -1.0], [-1.0, float("nan")]])
    lr = t([[-1.0, -1.5], [-1.0, -4.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    out = get_loss("aot")(lp, lr, mask=mask, beta=1.0)
    close(out.loss, (math.log1p(math.exp(2.5)) + math.log1p(math.exp(2.0))) / 2)


# --------------------------------------------------------------------------- KTO


def kto_rows(kl: list[float]):
    """Three rows with log-ratios r = (1 + ln 3, 1 - ln 3, 1) (reference 0), labels (1, 0, 0), and the
    mismatched pairs' log-ratios ``kl`` in column 1."""
    lp = t([[1 + LN3, kl[0]], [1 - LN3, kl[1]], [1.0, kl[2]]])
    return lp.requires_grad_(), torch.zeros_like(lp), t([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])


def test_kto_hand_worked():
    """beta 1; mismatched log-ratios (0.5, 1.5, 1.0): z0 = mean = 1.
    Row 0 desirable, r - z0 = ln 3: 1 - sigmoid(ln 3) = 1/4. Row 1 undesirable, z0 - r = ln 3: 1/4.
    Row 2 undesirable, z0 - r = 0: 1/2. Weights (2, 1): (2 * 1/4 + 1/4 + 1/2) / 3 = 1.25 / 3 = 0.416667;
    weights (1, 1): 1/3. No gradient reaches the mismatched column (z0 is detached)."""
    lp, lr, labels = kto_rows([0.5, 1.5, 1.0])
    out = get_loss("kto")(lp, lr, rewards=labels, beta=1.0, desirable_weight=2.0)
    close(out.loss, 1.25 / 3)
    close(out.metrics["kl"], 1.0)
    close(out.metrics["rewards/chosen"], 1 + LN3)
    close(out.metrics["rewards/rejected"], (1 - LN3 + 1) / 2)
    out.loss.backward()
    assert torch.all(lp.grad[:, 1] == 0) and torch.all(lp.grad[:, 0] != 0)
    lp, lr, labels = kto_rows([0.5, 1.5, 1.0])
    close(get_loss("kto")(lp, lr, rewards=labels, beta=1.0).loss, 1 / 3)


def test_kto_reference_point_is_clamped_at_zero():
    """Mismatched log-ratios (-1, -2, 0): mean -1, clamped to z0 = 0. Row 0: 1 - sigmoid(1 + ln 3);
    row 1: 1 - sigmoid(-(1 - ln 3)) = sigmoid(1 - ln 3); row 2: 1 - sigmoid(-1) = sigmoid(1)."""
    lp, lr, labels = kto_rows([-1.0, -2.0, 0.0])
    out = get_loss("kto")(lp, lr, rewards=labels, beta=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    close(out.loss, ((1 - sig(1 + LN3)) + sig(1 - LN3) + sig(1.0)) / 3)
    close(out.metrics["kl"], 0.0)


def test_kto_needs_labels():
    lp, lr, _ = kto_rows([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="loss 'kto' needs binary labels"):
        get_loss("kto")(lp, lr)


# --------------------------------------------------------------------------- mixes


def test_mix_hand_worked():
    """dpo 0.8 + sft 0.2, beta 1, on CPO's rows with a zero reference: DPO log(8/3)/2 = 0.490415, SFT (the chosen
    tokens' pooled NLL) (1 + 3)/(2 + 4) = 2/3: 0.8 * 0.490415 + 0.2 * 0.666667 = 0.525665. Each term is logged."""
    lp, lengths = t([[-1.0, -1.0 - LN3], [-3.0, -3.0]]), torch.tensor([[2, 4], [4, 1]])
    out = get_loss("mix")(lp, torch.zeros_like(lp), lengths, weights={"dpo": 0.8, "sft": 0.2}, beta=1.0)
    close(out.loss, 0.8 * math.log(8 / 3) / 2 + 0.2 * 2 / 3)
    close(out.metrics["mix/dpo"], math.log(8 / 3) / 2)
    close(out.metrics["mix/sft"], 2 / 3)
    assert "dpo/rewards/accuracy" in out.metrics
    # a term's own hyper-parameters override the shared beta: dpo at beta 2 on row 0 gives log(1 + 1/9)
    own = get_loss("mix")(lp, torch.zeros_like(lp), lengths, weights={"dpo": 1.0}, beta=1.0,
                          hparams={"dpo": {"beta": 2.0}})
    close(own.loss, (math.log(10 / 9) + math.log1p(1.0)) / 2)


@pytest.mark.parametrize("hparams, message", [
    ({}, "loss.weights: give a mapping"),
    ({"weights": {"nope": 1.0}}, "loss.weights.nope: not a registered loss"),
    ({"weights": {"kto": 1.0}}, "loss.weights.kto: loss 'kto' trains on binary"),
    ({"weights": {"ppo": 1.0}}, "loss.weights.ppo: loss 'ppo' trains on prompts"),
    ({"weights": {"mix": 1.0}}, "loss.weights.mix: not a registered loss a mix can use"),
    ({"weights": {"dpo": -1.0}}, "loss.weights.dpo must be a number >= 0"),
    ({"weights": {"dpo": 0.0}}, "loss.weights: every weight is 0"),
    ({"weights": {"dpo": 1.0}, "hparams": {"ipo": {"beta": 1.0}}}, "loss.hparams.ipo: 'ipo' is not a term"),
    ({"weights": {"dpo": 1.0}, "hparams": {"dpo": {"beta": -1.0}}}, "loss.hparams.dpo.beta must be > 0"),
    ({"weights": {"dpo": 1.0}, "beta": -1.0}, "loss.beta must be > 0"),
])
def test_mix_is_checked(hparams, message):
    with pytest.raises(ValueError, match=message):
        check_hparams("mix", hparams)
