"""LoRA through PEFT, and the reference as the same model with its adapters switched off.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) trains, next to
each frozen weight W0 (d_out, d_in) of the ``target_modules``, a low-rank update::

    h = W0 x + (alpha / r) * B A x,    A: (r, d_in), B: (d_out, r), B initialised to 0

With LoRA, preference training holds **one** set of base weights: the reference pi_ref of DPO
(Rafailov et al. 2023, eq. 7) is the policy with its adapters switched off (:class:`AdaptersOff`),
so no frozen copy of the model is kept. Reference log-probs cached on disk are keyed by the base
model's fingerprint (:func:`fingerprint_state`), so a LoRA run and a full fine-tuning run from the
same base model share the cache.

``conf/model/*.yaml`` gives the settings as ``model.lora``: null (no LoRA) or a mapping of
:class:`LoraArgs` fields (``enabled: false`` keeps the settings but switches LoRA off).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from alignexp.args import LoraArgs, lora_args  # noqa: F401  (the settings of model.lora)

log = logging.getLogger(__name__)

def is_peft(model) -> bool:
    """Whether ``model`` is a PEFT model (has adapters that can be switched off)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def apply_lora(model, args: LoraArgs):
    """``model`` wrapped by PEFT with LoRA adapters on ``args.target_modules``; only the adapters train.

    The adapters start as the identity (B = 0), so the wrapped model computes what ``model`` did.
    Adapters of a bf16 model are kept in fp32 (PEFT's ``autocast_adapter_dtype``).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=args.target_modules, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA: r=%d, alpha=%g, dropout=%g on %s: %d trainable of %d parameters (%.3f%%)", args.r,
             args.alpha, args.dropout, args.target_modules, trainable, total, 100 * trainable / total)
    return peft_model


class _AdaptersOffCall:
    """A submodule of the policy (decoder, output head) called with the adapters switched off."""

    def __init__(self, view: AdaptersOff, module: torch.nn.Module):
        self._view, self._module = view, module

    def __call__(self, *args, **kwargs):
        with self._view.adapters_off():
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


class AdaptersOff(torch.nn.Module):
    """The reference of a LoRA policy: the same model, called with its adapters switched off.

    It holds no weights of its own (the policy is not registered as a submodule, so nothing is
    counted, saved, moved or optimised twice) and answers what the rest of alignexp asks of a model:
    ``forward`` (generation), ``get_decoder`` / ``get_output_embeddings``
    (:func:`alignexp.models.logprobs.sequence_logps`), ``config``, ``dtype``, ``parameters``. Each call
    runs in eval mode (no dropout) and restores the policy's mode afterwards. ``train``/``eval`` and
    ``requires_grad_`` on the view are no-ops: they never touch the policy.
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        if not is_peft(policy):
            raise TypeError(f"AdaptersOff needs a PEFT model (alignexp.models.lora.apply_lora), got {type(policy).__name__}")
        self.__dict__["policy"] = policy  # deliberately not a registered submodule

    @contextmanager
    def adapters_off(self) -> Iterator[None]:
        policy = self.policy
        was_training = policy.training
        policy.train(False)
        try:
            with policy.disable_adapter():
                yield
        finally:
            policy.train(was_training)

    def forward(self, *args, **kwargs):
        with self.adapters_off():
            return self.policy(*args, **kwargs)

    def get_decoder(self):
        return _AdaptersOffCall(self, self.policy.get_decoder())

    def get_output_embeddings(self):
        return _AdaptersOffCall(self, self.policy.get_output_embeddings())

    def get_base_model(self):
        return self.policy.get_base_model()

    @property
    def config(self):
        return self.policy.config

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.get_base_model().dtype

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)

    def train(self, mode: bool = True) -> AdaptersOff:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdaptersOff:
        return self


def _lora_deltas(base: torch.nn.Module) -> dict[str, Tensor]:
    """``{"<module>.weight": (alpha / r) * B @ A}`` for every active, unmerged LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False) or module.disable_adapters:
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                key = f"{name}.weight"
                delta = module.get_delta_weight(adapter).detach()
                deltas[key] = deltas[key] + delta if key in deltas else delta
    return deltas


def fingerprint_state(model) -> dict[str, Tensor]:
    """The weights of the function ``model`` computes, under the plain (un-wrapped) model's names.

    A plain model: its state dict. :class:`AdaptersOff`: the base weights alone (LoRA entries
    dropped, ``.base_layer`` removed), so it equals the state dict of the model LoRA was applied to.
    A PEFT model with adapters on: the merged weights W0 + (alpha / r) B A, so an untrained adapter
    (B = 0) fingerprints like its base model and a trained one does not.
    """
    if isinstance(model, AdaptersOff):
        return _plain_names(model.policy.get_base_model().state_dict(), {})
    if is_peft(model):
        base = model.get_base_model()
        return _plain_names(base.state_dict(), _lora_deltas(base))
    return model.state_dict()


def _plain_names(state: dict[str, Tensor], deltas: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` under the plain model's names, each delta added in fp32 and the sum cast once to the base
    weight's dtype: a bf16 base weight plus a delta rounded to bf16 first would round twice, and lose
    updates that a single rounding of the exact sum keeps."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        out[key] = (value.float() + deltas[key].float()).to(value.dtype) if key in deltas else value
    return out


def merged_state_dict(model) -> dict[str, Tensor]:
    """The policy's weights with its adapters merged in (a plain model: its state dict), out of place.

    Unlike PEFT's ``merge_and_unload``, the model itself is not changed, so the base weights (the
    reference) keep their exact values. :class:`AdaptersOff` (the reference of a LoRA policy) gives the
    base weights alone: it holds no weights of its own, so its ``state_dict`` would be empty.
    """
    return fingerprint_state(model) if is_peft(model) or isinstance(model, AdaptersOff) else model.state_dict()


def save_pretrained_merged(model, folder: str | Path) -> None:
    """Save ``model`` in Hugging Face format; a LoRA policy is saved with its adapters merged, so
    ``from_pretrained``, vLLM and lm-eval-harness read it as a plain model."""
    if not is_peft(model):
        model.save_pretrained(folder)
        return
    base = model.get_base_model()
    state = {k: v.detach().clone().contiguous() for k, v in merged_state_dict(model).items()}
    base.save_pretrained(folder, state_dict=state)
