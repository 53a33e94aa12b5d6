"""The loss registry: each loss is a pure function of (B, n) log-prob tensors.

Contract (../DESIGN.md): ``get_loss(name)(policy_logps, ref_logps=None, lengths=None, rewards=None,
mask=None, **hparams) -> LossOutput``. Column 0 is the best response. ``policy_logps`` and
``ref_logps`` are *summed* response log-probabilities; ``lengths`` counts response tokens;
``mask`` is True where a response exists (lists shorter than n are masked, never padded into a loss).
A loss declares the training ``stage`` that runs it and the ``data`` it reads. The one exception to
the (B, n) layout is declared ``per_token``: PPO's loss takes per-token (B, T) tensors of a rollout
(right-padded, ``mask`` True on real tokens) and its own keyword tensors (:mod:`alignexp.losses.ppo`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LossOutput:
    """``loss``: the batch mean, a scalar. ``metrics``: named tensors for logging (detached by the caller)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# Arguments of a loss function that are tensors supplied by the module, never hyper-parameters.
TENSOR_ARGS = frozenset({"policy_logps", "ref_logps", "lengths", "rewards", "mask", "target_logps"})


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function plus what it needs. Calling the spec calls the function.

    ``stage``: the pipeline stage that trains with it (``preference``, ``reward_model``, ``ppo``, or a
    user's own; :mod:`alignexp.pipeline.context`). ``data``: what it trains on: ``rankings`` (the
    sampler's, as pairs or lists), ``best`` (the best response of each ranking), ``demonstrations``
    (the task's SFT examples), ``prompts`` (the task's prompts, sampled online) or ``binary`` feedback (one
    response each, desirable or not, packed with a mismatched response: :func:`alignexp.losses.kto.kto_loss`).
    ``per_token``: its tensors are per token (B, T) rather than per response (B, n).
    """

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    needs_rewards: bool = False
    listwise: bool = False
    min_responses: int = 2
    uses_scores: bool = False
    """Whether the loss reads a batch's ranking scores (``rewards``): as labels (RRHF, PRO, LiPO) or for
    their ties (ranked DPO, the reward model). The collator passes scores only when every ranking of a
    batch has them, so such a loss must not see a dataset that mixes scored and unscored rankings
    (:func:`alignexp.sampling.pairing.check_scores`). Pairwise losses read pairs whose order the pair
    builders fixed from the scores, one ranking at a time, so they do not use them."""
    stage: str = "preference"
    data: str = "rankings"
    per_token: bool = False
    check: Callable[[dict], None] | None = None
    """Checks of its own on the hyper-parameters (choices, a mapping's keys), run by :func:`check_hparams`
    after the shared ones; raises ValueError naming the key."""
    constraints: Mapping[str, tuple[Callable[[float], bool], str]] = field(default_factory=dict)
    """Constraints of this loss that replace the shared ones of :data:`HPARAM_CONSTRAINTS` for a key
    (EXO's ``label_smoothing`` must be > 0, for example)."""

    def __call__(self, *args, **kwargs) -> LossOutput:
        return self.fn(*args, **kwargs)

    @property
    def uses_target(self) -> bool:
        """Whether the loss takes the target response's log-probs (``target_logps``, packed as one more column)."""
        return "target_logps" in inspect.signature(self.fn).parameters

    @property
    def hparams(self) -> dict[str, object]:
        """The loss's hyper-parameters and their defaults, read from the function's signature."""
        return {name: p.default for name, p in inspect.signature(self.fn).parameters.items()
                if name not in TENSOR_ARGS and p.kind is p.KEYWORD_ONLY}


_REGISTRY: dict[str, LossSpec] = {}


DATA_KINDS = ("rankings", "best", "demonstrations", "prompts", "binary")


def register_loss(name: str, *, needs_reference: bool, needs_rewards: bool = False,
                  listwise: bool = False, min_responses: int = 2, uses_scores: bool = False,
                  aliases: tuple[str, ...] = (), stage: str = "preference", data: str = "rankings",
                  per_token: bool = False, check: Callable[[dict], None] | None = None,
                  constraints: Mapping[str, tuple[Callable[[float], bool], str]] | None = None):
    """Decorator: register ``fn`` under ``name`` (and ``aliases``) with what it needs.

    ``stage``: the training stage that runs it (alignexp/pipeline: ``preference``, ``reward_model``,
    ``ppo``, or a stage of your own). ``data``: what it trains on: the sampler's ``rankings`` (pairs for a
    pairwise loss), their ``best`` response alone, the task's ``demonstrations``, or its ``prompts``
    (sampled online, PPO), or ``binary`` feedback (one response per prompt, desirable or not: KTO; rankings
    are turned into it by the run's ``binary`` setting). ``per_token``: its tensors are (B, T) per token, not
    (B, n) (see :class:`LossSpec`). ``check``, ``constraints``: see :class:`LossSpec`.
    """
    if data not in DATA_KINDS:
        raise ValueError(f"register_loss({name!r}): data must be one of {', '.join(DATA_KINDS)}, got {data!r}")

    def decorator(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise KeyError(f"loss '{key}' is registered twice")
            _REGISTRY[key] = LossSpec(key, fn, needs_reference, needs_rewards, listwise, min_responses,
                                      uses_scores, stage, data, per_token, check, dict(constraints or {}))
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; a KeyError lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown loss '{name}'; registered losses: {', '.join(sorted(_REGISTRY))}") from None


def registered_losses() -> list[str]:
    return sorted(_REGISTRY)


def default_mask(policy_logps: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` as a bool tensor shaped like ``policy_logps`` (all True when None)."""
    if mask is None:
        return torch.ones_like(policy_logps, dtype=torch.bool)
    return mask.to(torch.bool)


def require(value: Tensor | None, what: str, loss: str) -> Tensor:
    if value is None:
        raise ValueError(f"loss '{loss}' needs {what}")
    return value


# The one table of hyper-parameter constraints: name -> (test, what the test requires).
# A hyper-parameter that is not listed here only has its type checked (that of its default).
HPARAM_CONSTRAINTS: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v > 0, "> 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "margin": (lambda v: v >= 0, ">= 0"),
    "sft_weight": (lambda v: v >= 0, ">= 0"),
    "rank_weight": (lambda v: v >= 0, ">= 0"),
    "clip_range": (lambda v: v > 0, "> 0"),
    "clip_range_value": (lambda v: v > 0, "> 0"),
    "vf_coef": (lambda v: v >= 0, ">= 0"),
    "alpha": (lambda v: v >= 0, ">= 0"),
    "gamma": (lambda v: v >= 0, ">= 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "desirable_weight": (lambda v: v >= 0, ">= 0"),
    "undesirable_weight": (lambda v: v >= 0, ">= 0"),
}


SWEEP_SHARED_HPARAMS = ("beta",)
"""Keys a sweep across losses sets for every loss (``-m loss=dpo,rrhf loss.beta=0.1,0.5``). A loss that
does not take one declares it ``null`` in its YAML, so the override composes, and ignores its value
(:func:`loss_kwargs` leaves it out; train.py logs that it does not apply)."""


def loss_kwargs(name: str, hparams: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """The keyword arguments for loss ``name``, and the shared sweep keys it does not take (ignored)."""
    known = get_loss(name).hparams
    kwargs = {k: v for k, v in hparams.items() if k != "name" and (k in known or k not in SWEEP_SHARED_HPARAMS)}
    ignored = sorted(k for k in hparams if k in SWEEP_SHARED_HPARAMS and k not in known)
    return kwargs, ignored


def check_hparams(name: str, hparams: Mapping[str, object]) -> None:
    """Validate the hyper-parameters given for loss ``name`` (the ``loss`` config group, minus ``name``).

    Raises ValueError naming the key: an unknown loss, a key that is not a keyword-only parameter of
    the loss function, a value of the wrong type (a number where the default is a number, a bool
    where it is a bool), a non-finite number, or a value that breaks :data:`HPARAM_CONSTRAINTS`
    (e.g. ``loss.beta must be > 0, got -1``). A ``name`` key, if present, is ignored.
    """
    if name not in _REGISTRY:
        raise ValueError(f"loss.name: unknown loss '{name}'; registered losses: {', '.join(registered_losses())}")
    spec = _REGISTRY[name]
    known = spec.hparams
    for key, value in hparams.items():
        if key == "name" or (key in SWEEP_SHARED_HPARAMS and key not in known):
            continue
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"loss.{key} is not a hyper-parameter of loss '{name}' (it takes: {allowed})")
        default = known[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"loss.{key} must be true or false, got {value!r}")
            continue
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"loss.{key} must be a string, got {value!r}")
        if isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"loss.{key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"loss.{key} must be finite, got {value}")
        constraint = spec.constraints.get(key, HPARAM_CONSTRAINTS.get(key))
        if constraint is not None and value is not None:
            test, requirement = constraint
            if not test(value):
                raise ValueError(f"loss.{key} must be {requirement}, got {value}")
    if spec.check is not None:
        spec.check({k: v for k, v in hparams.items() if k != "name"})
