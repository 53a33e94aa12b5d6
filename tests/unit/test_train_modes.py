"""Lightning warns of every module in eval mode at the start of a fit; alignexp keeps that warning only for
modules outside the frozen children (alignexp/pipeline/fit.py ``eval_mode_outside_frozen``): a frozen
reference is in eval mode on purpose, a policy left in eval mode is a fault worth the warning."""

from __future__ import annotations

import copy

from alignexp.args import ModelArgs, OptimArgs
from alignexp.lightning_modules.preference import PreferenceModule
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.pipeline.fit import eval_mode_outside_frozen

ARCH = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def test_only_modules_outside_the_frozen_reference_count():
    tokenizer = build_tokenizer(ModelArgs())
    policy = build_model(ModelArgs(arch=ARCH), tokenizer)
    module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(), reference=copy.deepcopy(policy))
    assert not module.reference.training and eval_mode_outside_frozen(module) == []
    module.policy.transformer.h[1].eval()  # a policy block left in eval mode: its dropout would be off
    assert eval_mode_outside_frozen(module) == ["policy.transformer.h.1", *[
        f"policy.transformer.h.1.{name}" for name, _ in module.policy.transformer.h[1].named_modules() if name]]
    module.policy.train().requires_grad_(False)  # a policy whose parameters are all frozen is a frozen child
    module.policy.eval()
    assert eval_mode_outside_frozen(module) == []
