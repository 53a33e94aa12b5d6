"""Each loss of the registry that TRL 1.16 also has, against TRL's own code on the same tensors.

TRL's losses live inside its trainers' methods, which read a model's outputs. Each check builds the trainer
without running its ``__init__`` (``object.__new__``), sets the attributes its loss method reads, and
gives it a stand-in model whose per-token log-probs are the (summed log-prob / length) of each response,
repeated over that response's tokens: so the trainer's sums, token means and pooled NLL are those of the
tensors our losses get. The calls are TRL's: ``DPOTrainer._compute_loss`` (every ``loss_type``, the
f-divergences, weighted lists), ``CPOTrainer.get_batch_loss_metrics`` (CPO, SimPO),
``ORPOTrainer.get_batch_loss_metrics`` and ``KTOTrainer._compute_loss``. Runs where trl is installed
(the ``bench`` extra).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignexp.losses import get_loss

pytest.importorskip("trl")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

B = 6
TOL = 2e-6  # float32 (TRL's alpha-divergence clamps only in half/bfloat16/float32)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def tensors(seed: int = 0):
    """(policy_logps, ref_logps, lengths) (B, 2), float32, log-probs below 0 (every token's < 0 too)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (B, 2), generator=g)
    policy = -(torch.rand(B, 2, generator=g) * 2.0 + 0.05) * lengths
    ref = -(torch.rand(B, 2, generator=g) * 2.0 + 0.05) * lengths
    return policy.float(), ref.float(), lengths


def per_token(logps: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width): logps / length on each of the row's first ``length`` positions, 0 after."""
    positions = torch.arange(width)[None, :]
    on = positions < lengths[:, None]
    return torch.where(on, (logps / lengths.to(logps.dtype))[:, None].expand(-1, width), torch.zeros(()))


def completion_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """A one-token prompt then ``length`` completion tokens: (rows, width + 1)."""
    positions = torch.arange(width + 1)[None, :]
    return ((positions >= 1) & (positions <= lengths[:, None])).long()


class _TokenModel:
    """Stands in for a causal LM under TRL's fused LM head: ``log_probs`` are given per token."""

    training = True

    def __init__(self, main: torch.Tensor, kl: torch.Tensor | None = None):
        self.main, self.kl = main, kl

    def __call__(self, input_ids=None, **kwargs):
        log_probs = self.kl if self.kl is not None and int(input_ids[0, 0]) == 1 else self.main
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(log_probs, dtype=torch.bool))


def trl_dpo(policy, ref, lengths, loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0,
            f_divergence="reverse_kl", f_alpha=0.5, discopop_tau=0.05) -> float:
    """TRL's DPOTrainer._compute_loss on (chosen, rejected) = columns (0, 1)."""
    trainer = object.__new__(DPOTrainer)
    width = int(lengths.max())
    both_lengths = torch.cat([lengths[:, 0], lengths[:, 1]])
    both_logps = torch.cat([policy[:, 0], policy[:, 1]])
    model = _TokenModel(per_token(both_logps, both_lengths, width))
    trainer.__dict__.update(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=f_divergence, f_alpha_divergence_coef=f_alpha,
        loss_types=list(loss_types), loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta,
        label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=discopop_tau), use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    mask = completion_mask(both_lengths, width)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    return float(trainer._compute_loss(model, inputs, return_outputs=False))


def ours(name, policy, ref, lengths, **hparams) -> float:
    out = get_loss(name)(policy, ref_logps=ref, lengths=lengths, **hparams)
    return float(out.loss)


DPO_CASES = [  # (our loss, our hparams, TRL loss_types, TRL weights, TRL settings)
    ("dpo", {"beta": 0.1}, ["sigmoid"], None, {"beta": 0.1}),
    ("cdpo", {"beta": 0.1, "label_smoothing": 0.1}, None, None, None),  # TRL's sigmoid has no smoothing: below
    ("dpo", {"beta": 0.3, "length_normalize": True}, ["sigmoid_norm"], None, {"beta": 0.3}),
    ("dpo", {"beta": 0.1, "f_divergence": "forward_kl"}, ["sigmoid"], None, {"f_divergence": "forward_kl"}),
    ("dpo", {"beta": 0.1, "f_divergence": "js_divergence"}, ["sigmoid"], None, {"f_divergence": "js_divergence"}),
    ("dpo", {"beta": 0.1, "f_divergence": "alpha_divergence"}, ["sigmoid"], None,
     {"f_divergence": "alpha_divergence", "f_alpha": 0.5}),
    ("dpo", {"beta": 0.1, "f_divergence": "alpha_divergence", "f_alpha": 0.3}, ["sigmoid"], None,
     {"f_divergence": "alpha_divergence", "f_alpha": 0.3}),
    ("dpo", {"beta": 0.2, "length_normalize": True, "f_divergence": "js_divergence"}, ["sigmoid_norm"], None,
     {"beta": 0.2, "f_divergence": "js_divergence"}),
    ("ipo", {"beta": 0.1, "length_normalize": True}, ["ipo"], None, {}),
    ("hinge", {"beta": 0.1}, ["hinge"], None, {}),
    ("rpo", {"beta": 0.1, "alpha": 1.0}, ["sigmoid", "sft"], [1.0, 1.0], {}),
    ("rpo", {"beta": 0.2, "alpha": 0.5}, ["sigmoid", "sft"], [1.0, 0.5], {"beta": 0.2}),
    ("apo_zero", {"beta": 0.1}, ["apo_zero"], None, {}),
    ("apo_down", {"beta": 0.1}, ["apo_down"], None, {}),
    ("nca", {"beta": 0.1}, ["nca_pair"], None, {}),
    ("exo", {"beta": 0.1, "label_smoothing": 1e-3}, ["exo_pair"], None, {"label_smoothing": 1e-3}),
    ("robust", {"beta": 0.1, "label_smoothing": 0.1}, ["robust"], None, {"label_smoothing": 0.1}),
    ("bco", {"beta": 0.1}, ["bco_pair"], None, {}),
    ("sppo_hard", {"beta": 0.1}, ["sppo_hard"], None, {}),
    ("discopop", {"beta": 0.1, "tau": 0.05}, ["discopop"], None, {"discopop_tau": 0.05}),
    ("aot", {"beta": 0.1}, ["aot"], None, {}),
    ("mix", {"weights": {"dpo": 0.8, "sft": 0.2}, "beta": 0.1}, ["sigmoid", "sft"], [0.8, 0.2], {}),
    ("mix", {"weights": {"dpo": 0.5, "ipo": 0.5}, "beta": 0.1, "hparams": {"ipo": {"length_normalize": True}}},
     ["sigmoid", "ipo"], [0.5, 0.5], {}),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", [c for c in DPO_CASES if c[2] is not None],
                         ids=lambda c: f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items() if k != 'weights')}")
def test_dpo_trainer_loss_types(case, seed):
    """Ours against TRL's DPOTrainer (``loss_type``, ``f_divergence_type``, ``loss_weights``) on the same pairs."""
    name, hparams, loss_types, weights, settings = case
    policy, ref, lengths = tensors(seed)
    expected = trl_dpo(policy, ref, lengths, loss_types, weights, **{"beta": hparams.get("beta", 0.1), **settings})
    assert math.isfinite(expected)
    assert abs(ours(name, policy, ref, lengths, **hparams) - expected) <= TOL * max(1.0, abs(expected))


def test_cdpo_is_trl_cdpo():
    """TRL 1.16's DPOTrainer has no smoothed sigmoid any more; its CPOTrainer ``sigmoid`` does: with summed
    log-ratios in place of the log-probs its loss is cDPO's. Checked through CPO's loss method (below)."""
    policy, ref, lengths = tensors(2)
    trainer = _cpo_trainer("sigmoid", beta=0.1, label_smoothing=0.1, cpo_alpha=0.0)
    losses, _, _ = trainer.cpo_loss(policy[:, 0] - ref[:, 0], policy[:, 1] - ref[:, 1])
    assert abs(ours("cdpo", policy, ref, lengths, beta=0.1, label_smoothing=0.1) - float(losses.mean())) <= TOL


# -- CPO, SimPO, ORPO: TRL's trainers compute log-probs and the NLL from logits --------------------------------

def _cpo_trainer(loss_type: str, beta: float, label_smoothing: float = 0.0, cpo_alpha: float = 1.0,
                 simpo_gamma: float = 0.5):
    from trl.experimental.cpo import CPOTrainer

    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                            simpo_gamma=simpo_gamma, alpha=0.0, accelerator=_Accelerator(), aux_loss_enabled=False,
                            is_encoder_decoder=False, pad_token_id=0)
    return trainer


class _LogitModel:
    """Stands in for a causal LM: logits over a 2-token vocabulary whose log-softmax at token 0 is the given
    per-token log-prob at each position that predicts a completion token."""

    def __init__(self, token_logps: torch.Tensor):
        # position t predicts token t + 1; the prompt is one token, so completion token j is predicted at j
        p = token_logps.exp().clamp(max=1 - 1e-7)
        self.logits = torch.stack([token_logps, torch.log1p(-p)], dim=-1)
        width = self.logits.shape[1]
        self.logits = torch.cat([self.logits, torch.zeros(self.logits.shape[0], 1, 2)], dim=1)[:, :width + 1]

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits)


def _pair_batch(policy: torch.Tensor, lengths: torch.Tensor):
    """TRL's tokenised pair batch (one-token prompt, completions of token 0) and a model giving ``policy``."""
    width = int(lengths.max())
    batch = {}
    for col, key in enumerate(("chosen", "rejected")):
        mask = completion_mask(lengths[:, col], width)
        attention = (torch.arange(width + 1)[None, :] <= lengths[:, col][:, None]).long()
        batch[f"{key}_input_ids"] = torch.zeros_like(mask)
        batch[f"{key}_attention_mask"] = attention
        batch[f"{key}_labels"] = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    both = torch.cat([policy[:, 0], policy[:, 1]])
    both_lengths = torch.cat([lengths[:, 0], lengths[:, 1]])
    return batch, _LogitModel(per_token(both, both_lengths, width))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, hparams, loss_type, settings", [
    ("cpo", {"beta": 0.1, "alpha": 1.0}, "sigmoid", {"beta": 0.1, "cpo_alpha": 1.0}),
    ("cpo", {"beta": 0.5, "alpha": 0.3}, "sigmoid", {"beta": 0.5, "cpo_alpha": 0.3}),
    ("simpo", {"beta": 2.0, "gamma": 0.5}, "simpo", {"beta": 2.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 1.0, "label_smoothing": 0.1}, "simpo",
     {"beta": 2.5, "cpo_alpha": 0.0, "simpo_gamma": 1.0, "label_smoothing": 0.1}),
    ("ranked_simpo", {"beta": 2.0, "gamma": 0.5}, "simpo", {"beta": 2.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5}),
])
def test_cpo_trainer(name, hparams, loss_type, settings, seed):
    """CPO and SimPO (and ranked SimPO at n = 2) against TRL's CPOTrainer.get_batch_loss_metrics."""
    policy, _, lengths = tensors(seed)
    trainer = _cpo_trainer(loss_type, **settings)
    batch, model = _pair_batch(policy, lengths)
    expected, _ = trainer.get_batch_loss_metrics(model, batch)
    assert abs(ours(name, policy, None, lengths, **hparams) - float(expected)) <= TOL * max(1.0, abs(float(expected)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_trainer(beta, seed):
    """ORPO against TRL's ORPOTrainer.get_batch_loss_metrics. TRL's NLL covers the prompt's tokens too; with a
    one-token prompt (never a label after the shift) it is the response's, which is ours."""
    from trl.experimental.orpo import ORPOTrainer

    policy, _, lengths = tensors(seed)
    trainer = object.__new__(ORPOTrainer)
    trainer.__dict__.update(beta=beta, accelerator=_Accelerator(), aux_loss_enabled=False, is_encoder_decoder=False,
                            padding_value=0)
    batch, model = _pair_batch(policy, lengths)
    expected, _ = trainer.get_batch_loss_metrics(model, batch)
    assert abs(ours("orpo", policy, None, lengths, beta=beta) - float(expected)) <= TOL


# -- KTO ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_kto_trainer(beta, weights, seed):
    """KTO against TRL's KTOTrainer._compute_loss: rows of (completion, label), the KL pairs TRL's collator
    builds (the completions cycled by one: row b's KL completion is row b-1's), reference log-probs precomputed."""
    policy, ref, lengths = tensors(seed)
    labels = torch.tensor([True, False, True, True, False, False])
    kl_policy, kl_ref = torch.roll(policy[:, 0], 1), torch.roll(ref[:, 0], 1)
    # make the KL estimate positive for one seed and negative (clamped to 0) for the other
    shift = 1.5 if seed == 0 else -1.5
    kl_policy = kl_policy + shift
    kl_lengths = torch.roll(lengths[:, 0], 1)
    width = int(max(lengths[:, 0].max(), kl_lengths.max()))
    trainer = object.__new__(KTOTrainer)
    model = _TokenModel(per_token(policy[:, 0], lengths[:, 0], width), kl=per_token(kl_policy, kl_lengths, width))
    trainer.__dict__.update(model=model, accelerator=_Accelerator(), aux_loss_enabled=False, calculate_KL=True,
                            precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=weights[0],
                            undesirable_weight=weights[1], _metrics={"train": defaultdict(list),
                                                                     "eval": defaultdict(list)},
                            _total_train_tokens=0, _tp_size=1)
    mask, kl_mask = completion_mask(lengths[:, 0], width), completion_mask(kl_lengths, width)
    inputs = {"label": labels, "input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "KL_input_ids": torch.ones_like(kl_mask),
              "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
              "ref_logps": ref[:, 0], "ref_KL_logps": kl_ref}
    expected = float(trainer._compute_loss(model, inputs, return_outputs=False))
    ours_out = get_loss("kto")(torch.stack([policy[:, 0], kl_policy], 1), ref_logps=torch.stack([ref[:, 0], kl_ref], 1),
                               lengths=torch.stack([lengths[:, 0], kl_lengths], 1),
                               rewards=labels.float()[:, None].expand(-1, 2), beta=beta,
                               desirable_weight=weights[0], undesirable_weight=weights[1])
    assert abs(float(ours_out.loss) - expected) <= TOL
    assert abs(float(ours_out.metrics["kl"]) - trainer._metrics["train"]["kl"][-1]) <= TOL
