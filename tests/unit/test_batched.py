"""One batched forward over encoded examples (alignexp.models.batched.map_batches), as used for response
log-probs (policy and reference) and reward-model scores: batching changes no value."""

from __future__ import annotations

import pytest
import torch

from alignexp.judges.reward_model import build_reward_model, score_encoded, sequence_scores
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.batched import map_batches
from alignexp.models.logprobs import EncodedExample, pack, sequence_logps
from alignexp.models.reference import response_logps

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}


def ids(seed: int, length: int) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# 5 examples with 1 to 3 responses of different lengths: batches of 2 leave a ragged last batch.
ENCODED = [EncodedExample(ids(10 * k, 3 + k), [ids(10 * k + j + 1, 2 + (k + j) % 4) for j in range(1 + k % 3)])
           for k in range(5)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs(arch=ARCH))


def one_by_one(model, forward) -> list[torch.Tensor]:
    """Each example alone in its own batch, straight through ``forward``: the values batching must keep."""
    with torch.no_grad():
        return [forward(model, pack([ex], pad_id=0))[0] for ex in ENCODED]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_response_logps_equal_each_example_alone(tokenizer, batch_size):
    model = build_model(ModelArgs(arch=ARCH), tokenizer).train()
    rows = response_logps(model, ENCODED, pad_id=0, batch_size=batch_size)
    expected = one_by_one(model.eval(), lambda m, b: sequence_logps(m, b)[0])
    assert [r.shape[0] for r in rows] == [len(ex.response_ids) for ex in ENCODED]  # masked slots dropped
    for row, want in zip(rows, expected):
        assert row.dtype == torch.float32 and row.device.type == "cpu"
        torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)


def test_reward_scores_equal_each_example_alone(tokenizer):
    model = build_reward_model(ModelArgs(arch=ARCH), tokenizer)
    rows = score_encoded(model, ENCODED, pad_id=0, batch_size=2)
    for row, want in zip(rows, one_by_one(model.eval(), sequence_scores)):
        torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)


def test_map_batches_restores_the_mode_and_takes_no_gradients(tokenizer):
    model = build_model(ModelArgs(arch=ARCH), tokenizer).train()
    seen = []

    def forward(m, batch):
        seen.append((m.training, torch.is_grad_enabled(), batch.shape))
        return sequence_logps(m, batch)[0]

    map_batches(model, ENCODED, 0, 2, forward)
    assert model.training  # restored after the eval-mode forwards
    assert [s[:2] for s in seen] == [(False, False)] * 3 and [s[2][0] for s in seen] == [2, 2, 1]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        map_batches(model, ENCODED, 0, 0, forward)
