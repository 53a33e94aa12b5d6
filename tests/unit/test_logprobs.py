"""Shared-prefix packing (alignexp.models.logprobs) against the plain per-sequence computation.

The reference is what every other codebase does: run ``prompt + response`` alone through the model
(standard causal attention, positions 0..L-1, the model's own forward and head) and sum the
log-probs of the response tokens. Packed log-probs must equal it to 1e-5 (fp32), for ragged lists
(masked slots), several examples sharing a row, the target column, eager and SDPA attention, and
both forwards: padding-free (the default) and over the padded rows (``flat=None``, the fallback).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from alignexp.models.attention import block_attention
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import (
    EncodedExample,
    block_mask,
    first_fit_decreasing,
    length_buckets,
    pack,
    response_states,
    sequence_logps,
    token_logps,
)

TINY = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
BOS, EOS, PAD = 257, 258, 256


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs())


def tiny_model(tokenizer, attn: str = "sdpa", **arch):
    config = yaml.safe_load(TINY.read_text())
    config["arch"] = {**config["arch"], **arch}
    return build_model(ModelArgs(**{**config, "attn_implementation": attn}), tokenizer).eval()


def padded(batch):
    """The same batch without its padding-free layout: the forward runs over the padded rows."""
    return dataclasses.replace(batch, flat=None)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tokenizer):
    return tiny_model(tokenizer, request.param)


def ids(seed: int, length: int, eos: bool = True) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(0, 256, (length - int(eos),), generator=g).tolist()
    return body + ([EOS] if eos else [])


def examples() -> list[EncodedExample]:
    """Ragged lists (3, 1, 2 responses and an empty one), prompts of 1 to 12 tokens, two scored."""
    return [
        EncodedExample([BOS] + ids(1, 11, eos=False), [ids(2, 5), ids(3, 9), ids(4, 2)], ids(5, 4), [3.0, 2.0, 1.0]),
        EncodedExample([BOS] + ids(6, 3, eos=False), [ids(7, 7)], ids(8, 6), [0.5]),
        EncodedExample([BOS], [ids(9, 1), ids(10, 4)], ids(11, 3), None),
        EncodedExample([BOS] + ids(12, 5, eos=False), [ids(13, 3), []], ids(14, 2), None),
    ]


@torch.no_grad()
def plain_logp(model, prompt: list[int], response: list[int]) -> float:
    """sum_t log p(y_t | x, y_<t), with prompt + response run alone through the model's own forward."""
    sequence = torch.tensor([prompt + response])
    logits = model(input_ids=sequence, use_cache=False).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logps.gather(1, torch.tensor(response)[:, None]).sum().item()


def expected_logps(model, batch_examples: list[EncodedExample], n: int, with_target: bool) -> torch.Tensor:
    out = torch.zeros(len(batch_examples), n + int(with_target))
    for b, ex in enumerate(batch_examples):
        responses = ex.response_ids + [[]] * (n - len(ex.response_ids)) + ([ex.target_ids] if with_target else [])
        for k, response in enumerate(responses):
            if response:
                out[b, k] = plain_logp(model, ex.prompt_ids, response)
    return out


@pytest.mark.parametrize("layout", ["padding-free", "padded"])
@pytest.mark.parametrize("with_target", [False, True])
def test_packed_logps_equal_each_sequence_run_alone(model, with_target, layout):
    batch_examples = examples()
    batch = pack(batch_examples, pad_id=PAD, with_target=with_target)
    assert batch.input_ids.shape[0] < len(batch_examples)  # short examples share a row
    if layout == "padded":
        batch = padded(batch)
    with torch.no_grad():
        logps, lengths, mask = sequence_logps(model, batch)
    expected = expected_logps(model, batch_examples, 3, with_target)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    target_lengths = [[4], [6], [3], [2]] if with_target else [[]] * 4
    assert lengths.tolist() == [[5, 9, 2] + target_lengths[0], [7, 0, 0] + target_lengths[1],
                                [1, 4, 0] + target_lengths[2], [3, 0, 0] + target_lengths[3]]
    assert mask.tolist() == (lengths > 0).tolist()
    assert (logps[~mask] == 0).all()


def test_every_layout_gives_the_same_logps_and_gradients(tokenizer):
    """The padding-free forward, the padded one (two rows), and all blocks in one padded row: the same
    log-probs, and the same gradient as the sum of the plain per-sequence log-probs."""
    model = tiny_model(tokenizer).train()
    batch_examples = examples()
    plain = torch.zeros(len(batch_examples), 3)
    for b, ex in enumerate(batch_examples):
        for k, r in enumerate(ex.response_ids):
            if r:
                logits = model(input_ids=torch.tensor([ex.prompt_ids + r])).logits[0, len(ex.prompt_ids) - 1:-1]
                plain[b, k] = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(r)[:, None]).sum()
    plain.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    total = sum(len(ex.prompt_ids) + sum(map(len, ex.response_ids)) for ex in batch_examples)
    for budget, rows, flat in ((None, 2, True), (None, 2, False), (total, 1, False)):
        model.zero_grad()
        batch = pack(batch_examples, pad_id=PAD, row_budget=budget)
        assert batch.input_ids.shape[0] == rows
        logps = sequence_logps(model, batch if flat else padded(batch))[0]
        torch.testing.assert_close(logps, plain.detach(), atol=1e-5, rtol=0)
        logps.sum().backward()
        for p, g in zip(model.parameters(), expected_grads):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_eager_and_sdpa_agree(tokenizer):
    batch = pack(examples(), pad_id=PAD, with_target=True)
    with torch.no_grad():
        sdpa = sequence_logps(tiny_model(tokenizer, "sdpa"), batch)[0]
        eager = sequence_logps(tiny_model(tokenizer, "eager"), padded(batch))[0]
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_grouped_query_attention(tokenizer):
    """Two key/value heads for four query heads (Mistral-style): block attention repeats them."""
    model = tiny_model(tokenizer, num_key_value_heads=2)
    batch = pack(examples(), pad_id=PAD)
    with torch.no_grad():
        logps = sequence_logps(model, batch)[0]
    torch.testing.assert_close(logps, expected_logps(model, examples(), 3, False), atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence_logps(model, padded(batch))[0].detach(), logps, atol=1e-5, rtol=0)


def test_the_attention_implementation_is_restored(tokenizer):
    """An eager model runs its padding-free forward under the SDPA entry; its configuration is put back,
    also after an error inside the forward. block_attention refuses calls without a layout."""
    model = tiny_model(tokenizer, "eager")
    batch = pack(examples(), pad_id=PAD)
    sequence_logps(model, batch)
    assert model.config._attn_implementation == "eager"
    broken = dataclasses.replace(batch, flat=dataclasses.replace(batch.flat, order=batch.flat.order[:1]))
    with pytest.raises(RuntimeError):
        sequence_logps(model, broken)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="block_attention runs only inside alignexp.models.attention.flat_forward"):
        block_attention(None, torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), None)


def test_token_logps_are_the_per_token_terms(tokenizer):
    model = tiny_model(tokenizer)
    batch = pack(examples(), pad_id=PAD)
    with torch.no_grad():
        per_token = token_logps(model, batch)
        again = token_logps(model, batch, response_states(model, batch))
        summed = sequence_logps(model, batch)[0]
    assert per_token.shape == (int(batch.lengths.sum()),)
    torch.testing.assert_close(again, per_token)
    torch.testing.assert_close(torch.zeros(summed.numel()).index_add(0, batch.slot, per_token).view(summed.shape),
                               summed)


def test_layout_positions_sources_and_targets():
    """Hand-worked layout of two examples that share one row (width 9 = the longer block)."""
    a = EncodedExample([BOS, 10, 11], [[20, EOS], [30, 31, EOS]])  # block of 3 + 2 + 3 = 8 tokens
    b = EncodedExample([BOS], [[40]])  # block of 2 tokens; 8 + 2 > 9, so a row of its own
    c = EncodedExample([BOS], [[]])  # block of 1 token: joins a's row
    batch = pack([a, b, c], n=2, pad_id=PAD, row_budget=9)
    assert batch.input_ids.tolist() == [[BOS, 10, 11, 20, EOS, 30, 31, EOS, BOS],
                                        [BOS, 40, PAD, PAD, PAD, PAD, PAD, PAD, PAD]]
    # positions restart after the prompt for each response
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0]]
    # the first token of each response is predicted from the prompt's last state (flat index 2, then 9)
    assert batch.source_index.tolist() == [2, 3, 2, 5, 6, 9]
    assert batch.target_ids.tolist() == [20, EOS, 30, 31, EOS, 40]
    assert batch.slot.tolist() == [0, 0, 1, 1, 1, 2]
    assert batch.lengths.tolist() == [[2, 3], [1, 0], [0, 0]]
    # the mask written block by block is block_mask of the layout's segments and documents
    segment = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 0], [0, 1, -1, -1, -1, -1, -1, -1, -1]])
    document = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 2], [1, 1, -1, -1, -1, -1, -1, -1, -1]])
    assert torch.equal(batch.attention_mask, block_mask(segment, document))
    # response k ends at the prompt's last position plus the lengths of slots 0..k (the reward model reads it)
    prompt_last = {0: 2, 1: 9}
    ends = [prompt_last[b] + int(batch.lengths[b, :k + 1].sum()) for b, k in ((0, 0), (0, 1), (1, 0))]
    assert [batch.input_ids.view(-1)[e].item() for e in ends] == [EOS, EOS, 40]


def test_block_mask_by_hand():
    segment = torch.tensor([[0, 0, 1, 1, 2, 0, -1]])
    document = torch.tensor([[0, 0, 0, 0, 0, 1, -1]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],  # prompt of example 0: causal over the prompt
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # response 0 sees the prompt and itself
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # response 1 sees the prompt, not response 0
        [0, 0, 0, 0, 0, 1, 0],  # example 1's prompt sees nothing of example 0
        [0, 0, 0, 0, 0, 0, 1],  # padding sees itself
    ], dtype=torch.bool)
    assert block_mask(segment, document).tolist() == [[expected.tolist()]]
    # without documents, one example per row (the old contract)
    assert block_mask(segment[:, :5]).tolist() == [[expected[:5, :5].tolist()]]


def test_padding_free_layout_by_hand():
    """Blocks of 8 and 2 tokens (prompts of 3 and 1) in example order, sharing one attention bucket: key
    rows of 8, prompt calls over the first 3 keys, query rows of 5 response tokens; padded slots read
    token 0 (masked as keys, dropped as outputs)."""
    a = EncodedExample([BOS, 10, 11], [[20, EOS], [30, 31, EOS]])
    b = EncodedExample([BOS], [[40]])
    batch = pack([a, b], pad_id=PAD)
    flat = batch.flat
    assert batch.input_ids.view(-1)[flat.token_index].tolist() == [BOS, 10, 11, 20, EOS, 30, 31, EOS, BOS, 40]
    assert flat.source.tolist() == [2, 3, 2, 5, 6, 8]  # the states of source_index, among the 10 tokens
    assert flat.document.tolist() == [0] * 8 + [1] * 2
    assert flat.segment.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 0, 1]  # prompt 0, then response k is k + 1
    assert [(k.rows, k.width, k.prompt, k.responses) for k in flat.buckets] == [(2, 8, 3, 5)]
    assert flat.key_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0]
    assert flat.query_index.tolist() == [3, 4, 5, 6, 7, 9, 0, 0, 0, 0]
    # outputs: prompt call (2 x 3) = [0, 1, 2, 8, -, -], then response call (2 x 5) = [3, ..., 7, 9, -, ...]
    assert flat.order.tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 3, 11]
    assert flat.buckets[0].mask[:, 0].int().tolist() == [[
        [1, 1, 1, 1, 0, 0, 0, 0],  # response 0 sees the prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # response 1 sees the prompt, not response 0
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ], [
        [1, 1, 0, 0, 0, 0, 0, 0],  # b's response sees b's prompt and itself
        [1, 0, 0, 0, 0, 0, 0, 0],  # padded query slots read the first key (their output is dropped)
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
    ]]


def test_length_buckets():
    """Cost = sum(blocks x longest^2) + call_cost per bucket. Lengths 10, 9, 3 with call_cost 50:
    {10, 9}, {3} costs 2*100 + 50 + 9 + 50 = 309, less than one bucket (3*100 + 50 = 350) or three
    (100 + 81 + 9 + 150 = 340). Free calls: one bucket each; dear calls: one bucket."""
    assert length_buckets([3, 10, 9], call_cost=50) == [[1, 2], [0]]
    assert length_buckets([3, 10, 9], call_cost=0) == [[1], [2], [0]]
    assert length_buckets([3, 10, 9], call_cost=10**6) == [[1, 2, 0]]


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 9, 2, 4, 7], 9) == [[1], [4, 2], [0, 3]]
    with pytest.raises(ValueError, match="item 0 of size 10 exceeds the capacity 9"):
        first_fit_decreasing([10], 9)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="example 1 has 3 responses, more than n=2"):
        pack([EncodedExample([BOS], [[1]]), EncodedExample([BOS], [[1], [2], [3]])], n=2)
    with pytest.raises(ValueError, match="example 0 has no target_ids"):
        pack([EncodedExample([BOS], [[1]])], with_target=True)
    with pytest.raises(ValueError, match="example 0 has no prompt tokens"):
        pack([EncodedExample([], [[1]])])
    with pytest.raises(ValueError, match="no examples"):
        pack([])


def test_rewards_are_packed_by_slot():
    batch = pack(examples()[:2], pad_id=PAD)
    assert batch.rewards is not None
    assert batch.rewards[0].tolist() == [3.0, 2.0, 1.0]
    assert batch.rewards[1, 0].item() == 0.5 and batch.rewards[1, 1:].isnan().all()
    assert pack(examples(), pad_id=PAD).rewards is None  # not every example is scored


# -- final logit soft-capping (Gemma-2, Gemma-3) ---------------------------------------------------------------
def softcapped_model(tokenizer, cap: float | None = 5.0):
    """A 2-layer Gemma-2 whose logits are soft-capped at ``cap`` (wide init, so the cap matters)."""
    return tiny_model(tokenizer, "eager", model_type="gemma2", head_dim=32, num_key_value_heads=2,
                      final_logit_softcapping=cap, attn_logit_softcapping=None, sliding_window=64,
                      layer_types=["full_attention", "full_attention"], initializer_range=0.5)


def test_logprobs_apply_the_final_soft_capping_in_every_chunk(tokenizer):
    """log softmax(c * tanh(logits / c)) at the targets, as the model's own forward computes its logits:
    by :func:`sequence_logps` on both layouts, and by the chunked head with chunks of 2 tokens."""
    from alignexp.models.logprobs import chunked_token_logps, logit_softcap

    model = softcapped_model(tokenizer)
    assert logit_softcap(model) == 5.0 and logit_softcap(softcapped_model(tokenizer, None)) is None
    batch_examples = examples()
    with torch.no_grad():
        expected = expected_logps(model, batch_examples, 3, False)
        batch = pack(batch_examples, pad_id=PAD)
        for layout in (batch, padded(batch)):
            torch.testing.assert_close(sequence_logps(model, layout)[0], expected, atol=1e-4, rtol=0)
        states = response_states(model, batch)
        head = model.get_output_embeddings()
        capped = 5.0 * torch.tanh(head(states) / 5.0)
        whole = torch.log_softmax(capped, -1).gather(1, batch.target_ids[:, None])[:, 0]
        chunked = chunked_token_logps(head, states, batch.target_ids, chunk=2 * head.out_features, softcap=5.0)
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
        uncapped = torch.log_softmax(head(states), -1).gather(1, batch.target_ids[:, None])[:, 0]
        assert (uncapped - whole).abs().max() > 0.1  # the cap matters for this model


def test_tempered_logprobs_are_of_the_soft_capped_logits(tokenizer):
    """The log-probs at temperature T (PPO's policy and reference) are of softmax(capped logits / T), the
    distribution the engine samples from (the model's own forward caps its logits), whole or in chunks,
    and the reference's come from the same function without gradients."""
    from alignexp.models.logprobs import chunked_token_logps, logit_softcap
    from alignexp.models.reference import reference_token_logps

    model = softcapped_model(tokenizer)
    ex = examples()[0]
    batch = pack([EncodedExample(ex.prompt_ids, [ex.response_ids[0]])], pad_id=PAD)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex.prompt_ids + ex.response_ids[0]])).logits[0].float()
        p = len(ex.prompt_ids)
        expected = torch.log_softmax(logits[p - 1:-1] / 0.7, -1).gather(1, torch.tensor(ex.response_ids[0])[:, None])
        reference = reference_token_logps(model, batch, 0.7)
        torch.testing.assert_close(reference, expected[:, 0], atol=1e-5, rtol=0)
    states = response_states(model, batch).detach().requires_grad_(True)
    head = model.get_output_embeddings()
    chunked = chunked_token_logps(head, states, batch.target_ids, chunk=2 * head.out_features,
                                  softcap=logit_softcap(model), temperature=0.7)
    torch.testing.assert_close(chunked.detach(), expected[:, 0], atol=1e-5, rtol=0)
    assert chunked.requires_grad and not reference.requires_grad
    torch.testing.assert_close(token_logps(model, batch, temperature=0.7).detach(), expected[:, 0], atol=1e-5, rtol=0)
