"""Switching dropout off in a model that has it, so that a train-mode forward is deterministic.

RL and preference training compare log-probs across forwards (PPO's ratio against its rollout; DPO's
policy against its reference), so dropout noise would enter those differences; the DPO reference code
and TRL (``disable_dropout_in_model``) train with dropout off. Hugging Face backbones carry dropout
two ways: ``nn.Dropout`` modules (GPT-2's attention, residual and embedding dropout; LoRA's
``lora_dropout``), and float rates on the modules (:data:`RATES`: the ``attention_dropout`` that Llama-,
Mistral- and GPT-NeoX-style attention modules pass to the attention function in train mode, OPT's
``dropout`` and ``activation_dropout`` for its functional dropout). Both are set to 0.
"""

from __future__ import annotations

from torch import nn

RATES = ("attention_dropout", "dropout", "activation_dropout", "hidden_dropout")
"""Float attributes of a module that set a functional dropout's probability."""


def disable_dropout(model: nn.Module, *, lora: bool = True) -> int:
    """Set every dropout probability in ``model`` to 0, in place; returns how many were above 0.

    ``lora=False`` leaves LoRA's own dropout (PEFT's ``lora_dropout`` modules) as it is, for a caller
    that keeps ``model.lora.dropout`` as a setting. The model's config is not changed: a saved model
    keeps the dropout its architecture declares.
    """
    changed = 0
    for name, module in model.named_modules():
        if not lora and "lora_dropout" in name:
            continue
        if isinstance(module, nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
        for attribute in RATES:
            rate = module.__dict__.get(attribute)
            if isinstance(rate, float):
                changed += rate > 0
                setattr(module, attribute, 0.0)
    return changed
