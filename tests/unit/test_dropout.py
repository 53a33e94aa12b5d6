"""Dropout switched off (alignexp/models/dropout.py): models built with dropout 0.1 give the same log-probs in
two train-mode forwards afterwards, equal to their eval-mode log-probs; before, they do not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from alignexp.args import LoraArgs, ModelArgs
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.models.dropout import disable_dropout
from alignexp.models.logprobs import EncodedExample, pack, sequence_logps
from alignexp.models.lora import apply_lora

TINY = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs())


@pytest.fixture(scope="module")
def batch(tokenizer):
    return pack([EncodedExample([257, 97, 98], [[99, 100, 101, 258], [101, 258]]),
                 EncodedExample([257, 100], [[97, 98, 258]])], pad_id=tokenizer.pad_token_id)


def train_mode_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    with torch.no_grad():
        return sequence_logps(model, batch)[0], sequence_logps(model, batch)[0]


def eval_mode_logps(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return sequence_logps(model, batch)[0]


def test_gpt2_dropout_modules(tokenizer, batch):
    """GPT-2's config carries embedding, attention and residual dropout 0.1 (nn.Dropout modules):
    1 embedding + 2 layers x (attention, residual, MLP) = 7 modules."""
    model = build_model(ModelArgs(arch={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                        "n_positions": 128}), tokenizer)
    assert (model.config.embd_pdrop, model.config.attn_pdrop, model.config.resid_pdrop) == (0.1, 0.1, 0.1)
    first, second = train_mode_logps(model, batch)
    assert not torch.equal(first, second)
    assert disable_dropout(model) == 7
    first, second = train_mode_logps(model, batch)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, eval_mode_logps(model, batch), rtol=0, atol=1e-5)
    assert disable_dropout(model) == 0 and model.config.resid_pdrop == 0.1  # idempotent; the config is kept


def test_llama_attention_dropout_and_lora_dropout(tokenizer, batch):
    """A Llama with attention_dropout 0.1 (a float its attention modules pass to the attention function) and
    LoRA dropout 0.1 on q, k, v, o of 2 layers (8 nn.Dropout modules), with nonzero adapters so that
    LoRA's dropout changes the output. ``lora=False`` leaves LoRA's dropout on; the default turns it off."""
    config = yaml.safe_load(TINY.read_text())
    config["arch"]["attention_dropout"] = 0.1
    model = apply_lora(build_model(ModelArgs(**config), tokenizer), LoraArgs(r=4, dropout=0.1))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    assert disable_dropout(model, lora=False) == 2  # the two attention modules
    first, second = train_mode_logps(model, batch)
    assert not torch.equal(first, second)  # LoRA's dropout is still on
    assert disable_dropout(model) == 8
    first, second = train_mode_logps(model, batch)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, eval_mode_logps(model, batch), rtol=0, atol=1e-5)
