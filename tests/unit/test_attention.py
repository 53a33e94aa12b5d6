"""The padding-free forward where it now runs at 7B: with activation checkpointing (transformers' gradient
checkpointing and torch's ``checkpoint_wrapper`` as FSDP and Lightning apply it), with a sliding window
(Mistral), and through FlexAttention block masks; and the chunked output head. Each against the plain
per-sequence forward (``prompt + response`` alone through the model's own forward and head), forward
and gradients."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from test_logprobs import BOS, PAD, examples, ids, tiny_model

from alignexp.models import attention
from alignexp.models.attention import activation_checkpointing, flex_block_mask, padding_free_supported
from alignexp.models.backbone import ModelArgs, build_tokenizer
from alignexp.models.logprobs import EncodedExample, block_mask, chunked_token_logps, pack, sequence_logps

WINDOW = 4  # shorter than most prompts and responses below, so the window matters


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs())


def plain_logps_and_grads(model, batch_examples: list[EncodedExample], n: int = 3):
    """(B, n) summed response log-probs, each prompt + response run alone through the model's own forward
    (its own causal and sliding-window masks), and the gradient of their sum."""
    model.zero_grad()
    out = torch.zeros(len(batch_examples), n)
    for b, ex in enumerate(batch_examples):
        for k, r in enumerate(ex.response_ids):
            if r:
                logits = model(input_ids=torch.tensor([ex.prompt_ids + r])).logits[0, len(ex.prompt_ids) - 1:-1]
                out[b, k] = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r)[:, None]).sum()
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


def assert_packed_equals_plain(model, batch, expected, expected_grads):
    logps = sequence_logps(model, batch)[0]
    torch.testing.assert_close(logps.detach(), expected, atol=1e-5, rtol=0)
    logps.sum().backward()
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    model.zero_grad()


@pytest.fixture
def block_calls(monkeypatch):
    """Counts block_attention calls (and the windows they ran with): proof that the padding-free path ran."""
    calls = []
    real = attention.block_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("sliding_window"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "block_attention", counting)
    return calls


def hf_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrapper_checkpointing(model, reentrant: bool = False):
    """torch's checkpoint wrapper on every decoder layer, as FSDP/Lightning's activation checkpointing does."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    layer = type(model.get_decoder().layers[0])
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                                                 checkpoint_impl=impl),
                                   check_fn=lambda m: isinstance(m, layer))


@pytest.mark.parametrize("checkpointing", ["transformers", "checkpoint_wrapper"])
def test_padding_free_with_activation_checkpointing(tokenizer, block_calls, checkpointing):
    """Recomputed layers take the padding-free path again (the layout travels in the layer's arguments):
    log-probs and gradients equal the plain ones, and block attention ran in the forward and again in the
    backward (2 layers x 2)."""
    model = tiny_model(tokenizer, num_key_value_heads=2).train()
    expected, grads = plain_logps_and_grads(model, examples())
    (hf_checkpointing if checkpointing == "transformers" else wrapper_checkpointing)(model)
    decoder = model.get_decoder()
    assert activation_checkpointing(decoder) and padding_free_supported(decoder)
    assert_packed_equals_plain(model, pack(examples(), pad_id=PAD), expected, grads)
    assert len(block_calls) == 4


def test_eager_with_checkpointing_takes_the_padded_forward(tokenizer, block_calls):
    """An eager model's padding-free forward runs under the SDPA entry, which its recomputation would not
    use: with checkpointing it takes the padded rows, still equal to the plain forward."""
    model = tiny_model(tokenizer, "eager").train()
    expected, grads = plain_logps_and_grads(model, examples())
    wrapper_checkpointing(model)
    assert not padding_free_supported(model.get_decoder())
    assert_packed_equals_plain(model, pack(examples(), pad_id=PAD), expected, grads)
    assert block_calls == []


def window_examples() -> list[EncodedExample]:
    """Prompts of 12 and 6 tokens and responses of up to 9: all longer than the window of 4."""
    return [EncodedExample([BOS] + ids(21, 11, eos=False), [ids(22, 9), ids(23, 3)]),
            EncodedExample([BOS] + ids(24, 5, eos=False), [ids(25, 7), ids(26, 6), ids(27, 1)])]


@pytest.mark.parametrize("layout", ["padding-free", "padded"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sliding_window(tokenizer, block_calls, layout, checkpointing):
    """Mistral with a window of 4 tokens: each response sees the last 4 positions of prompt + itself, as in
    its own forward; the padding-free forward takes the window from the layer (with checkpointing too),
    the padded one adds it to its mask."""
    model = tiny_model(tokenizer, model_type="mistral", sliding_window=WINDOW, num_key_value_heads=2).train()
    batch_examples = window_examples()
    expected, grads = plain_logps_and_grads(model, batch_examples)
    windowless = tiny_model(tokenizer, model_type="mistral", sliding_window=None, num_key_value_heads=2)
    with torch.no_grad():
        assert (sequence_logps(windowless, pack(batch_examples, pad_id=PAD))[0] - expected).abs().max() > 0.1
    if checkpointing:
        hf_checkpointing(model)
    batch = pack(batch_examples, pad_id=PAD)
    block_calls.clear()
    assert_packed_equals_plain(model, batch if layout == "padding-free" else dataclasses.replace(batch, flat=None),
                               expected, grads)
    assert block_calls == ([WINDOW] * (4 if checkpointing else 2) if layout == "padding-free" else [])


def test_softcapping_takes_the_padded_forward(tokenizer):
    decoder = tiny_model(tokenizer).get_decoder()
    assert padding_free_supported(decoder)
    decoder.config.attn_logit_softcapping = 50.0  # Gemma-2-style: block attention does not implement it
    assert not padding_free_supported(decoder)


# -- FlexAttention ----------------------------------------------------------------------------------------
def flat_rule(batch, window: int | None) -> torch.Tensor:
    """The padding-free row's token-level mask from logprobs.block_mask (documents = examples, segments =
    prompt or response k), with the window over position ids."""
    flat = batch.flat
    allowed = block_mask(flat.segment[None], flat.document[None])[0, 0]
    if window is not None:
        positions = batch.position_ids.view(-1)[flat.token_index]
        allowed &= positions[:, None] - positions[None, :] < window
    return allowed


@pytest.mark.parametrize("window", [None, WINDOW])
def test_flex_block_mask_is_the_block_rule(window):
    """FlexAttention's mask, evaluated at every (query, key), equals the block rule; 2 examples, one
    response of 200 tokens, so the 128-token blocks that no query attends are skipped."""
    from torch.nn.attention.flex_attention import create_mask

    batch = pack([EncodedExample([BOS] + ids(31, 40, eos=False), [ids(32, 200), ids(33, 20)]),
                  EncodedExample([BOS, 7], [ids(34, 30)])], pad_id=PAD)
    positions = batch.position_ids.view(-1)[batch.flat.token_index]
    mask = flex_block_mask(batch.flat, positions, window)
    n = batch.flat.document.numel()
    dense = create_mask(mask.mask_mod, 1, 1, n, n, device="cpu")[0, 0]
    assert torch.equal(dense, flat_rule(batch, window))
    blocks = mask.to_dense()[0, 0]  # (3, 3) blocks of 128 tokens for n = 295: causal, and more with a window
    assert blocks.shape == (3, 3) and not blocks.triu(1).any()
    if window is not None:
        assert not blocks[2, 0]  # the last block's queries are more than 4 positions past every key of the first


@pytest.mark.slow
def test_flex_attention_forward_equals_the_plain_one(tokenizer):
    """A model built with flex_attention runs the padding-free row under the BlockMask (forward only: torch
    2.13 has no FlexAttention backward on the CPU; about 40 s of compilation)."""
    for arch in ({}, {"model_type": "mistral", "sliding_window": WINDOW}):
        model = tiny_model(tokenizer, "flex_attention", **arch)
        plain = tiny_model(tokenizer, "sdpa", **arch)
        batch_examples = window_examples() + examples()
        expected, _ = plain_logps_and_grads(plain, batch_examples)
        with torch.no_grad():
            logps = sequence_logps(model, pack(batch_examples, pad_id=PAD))[0]
        torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)


# -- the chunked head ---------------------------------------------------------------------------------------
def test_chunked_head_equals_the_whole_and_never_holds_more_than_a_chunk(tokenizer):
    """Chunks of 3 tokens (chunk = 3 x vocabulary logits): the same log-probs and gradients (head weights and
    states) as one log-softmax over all tokens, and the head never sees more than 3 tokens at once, in
    the forward or in the backward's recomputation."""
    model = tiny_model(tokenizer).train()
    head = model.get_output_embeddings()
    vocab = head.out_features
    g = torch.Generator().manual_seed(5)
    states = torch.randn(17, head.in_features, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (17,), generator=g)
    whole = torch.log_softmax(head(states), -1).gather(1, targets[:, None])[:, 0]
    weights = torch.randn(17, generator=g)
    (whole * weights).sum().backward()
    expected = (states.grad.clone(), head.weight.grad.clone())
    states.grad, head.weight.grad = None, None
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        chunked = chunked_token_logps(head, states, targets, chunk=3 * vocab)
        (chunked * weights).sum().backward()
    finally:
        hook.remove()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(states.grad, expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, expected[1], atol=1e-6, rtol=1e-5)
    assert max(seen) == 3 and sum(seen) == 2 * 17  # every chunk once forward, once recomputed
    with torch.no_grad():  # without gradients: no recomputation
        seen.clear()
        hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        chunked_token_logps(head, states, targets, chunk=3 * vocab)
        hook.remove()
    assert sum(seen) == 17
