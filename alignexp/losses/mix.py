"""Weighted mixes of registered losses (TRL's ``loss_type`` lists with ``loss_weights``; MPO, Wang et al. 2024,
"Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization")."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from alignexp.losses.registry import LossOutput, check_hparams, get_loss, register_loss, registered_losses

MIXABLE_DATA = ("rankings", "best", "demonstrations")
"""The data a term of a mix may read: pairs (a pairwise or listwise loss on the mix's pairs) or their
chosen response (``sft``, ``preferred_ft``: the NLL of column 0)."""


def term_hparams(name: str, weights: Mapping[str, float], hparams: Mapping[str, Mapping] | None,
                 shared: Mapping[str, object]) -> dict[str, object]:
    """The hyper-parameters of term ``name``: its own (``hparams[name]``), over the mix's shared ones that
    it takes (``beta``)."""
    known = get_loss(name).hparams
    own = dict((hparams or {}).get(name) or {})
    return {**{k: v for k, v in shared.items() if k in known and v is not None}, **own}


def check_mix(hparams: dict) -> None:
    """``weights``: a non-empty mapping of registered losses that a preference batch of pairs can train
    (stage ``preference``, data in :data:`MIXABLE_DATA`, not ``mix``) to numbers >= 0, one > 0;
    ``hparams``: a mapping from some of those losses to their hyper-parameters, each checked as its loss's."""
    weights = hparams.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("loss.weights: give a mapping of registered losses to weights, e.g. "
                         "loss.weights='{dpo: 0.8, sft: 0.2}'")
    for name, weight in weights.items():
        if name not in registered_losses() or name == "mix":
            raise ValueError(f"loss.weights.{name}: not a registered loss a mix can use; registered losses: "
                             f"{', '.join(n for n in registered_losses() if n != 'mix')}")
        spec = get_loss(name)
        if spec.stage != "preference" or spec.data not in MIXABLE_DATA or spec.per_token:
            raise ValueError(f"loss.weights.{name}: loss '{name}' trains on {spec.data} (stage {spec.stage}); a mix "
                             f"trains on preference pairs, so its terms read {', '.join(MIXABLE_DATA)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"loss.weights.{name} must be a number >= 0, got {weight!r}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError("loss.weights: every weight is 0")
    own = hparams.get("hparams") or {}
    if not isinstance(own, Mapping):
        raise ValueError(f"loss.hparams must be a mapping of loss names to their hyper-parameters, got {own!r}")
    for name, values in own.items():
        if name not in weights:
            raise ValueError(f"loss.hparams.{name}: '{name}' is not a term of the mix (loss.weights: "
                             f"{', '.join(weights)})")
        try:
            check_hparams(name, dict(values or {}))
        except ValueError as error:
            raise ValueError(str(error).replace("loss.", f"loss.hparams.{name}.", 1)) from None
    shared = {k: v for k, v in hparams.items() if k not in ("weights", "hparams")}
    for name in weights:
        check_hparams(name, term_hparams(name, weights, own, shared))


@register_loss("mix", needs_reference=True, check=check_mix)
def mix_loss(policy_logps: Tensor, ref_logps: Tensor | None = None, lengths: Tensor | None = None,
             rewards: Tensor | None = None, mask: Tensor | None = None, *,
             weights: dict | None = None, hparams: dict | None = None, beta: float | None = None) -> LossOutput:
    """A weighted sum of registered losses on the same batch of pairs:

        L = sum_i w_i L_i

    with ``weights`` {loss name: w_i} (e.g. ``{dpo: 0.8, sft: 0.2}``, TRL's MPO-style
    ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[0.8, 0.2]``). ``sft`` and ``preferred_ft`` in a mix
    are the chosen responses' token-mean NLL (TRL's ``sft`` loss type). ``beta`` is shared by the terms
    that take one (as TRL's is); ``hparams`` {loss name: {key: value}} sets a term's own, over ``beta``.

    Returns:
        ``loss``; metrics ``mix/<name>`` (each term's unweighted value) and each term's own metrics
        prefixed by its name (``dpo/rewards/accuracy``).
    """
    if not weights:
        raise ValueError("loss 'mix' needs loss.weights (a mapping of registered losses to weights)")
    total, metrics = None, {}
    for name, weight in weights.items():
        spec = get_loss(name)
        kwargs = term_hparams(name, weights, hparams, {"beta": beta})
        out = spec(policy_logps, ref_logps=ref_logps if spec.needs_reference else None, lengths=lengths,
                   rewards=rewards, mask=mask, **kwargs)
        metrics[f"mix/{name}"] = out.loss.detach()
        metrics.update({f"{name}/{key}": value for key, value in out.metrics.items()})
        total = weight * out.loss if total is None else total + weight * out.loss
    return LossOutput(total, metrics)

