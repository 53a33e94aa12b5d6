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
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
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
    block_calls.clear()  # the parity probe's, at build
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
    block_calls.clear()  # the parity probe's, at build
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


# -- per-layer windows, soft-capping, mask dtypes -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padding-free", "padded"])
def test_layouts_follow_per_layer_windows(tokenizer, block_calls, layout, monkeypatch):
    """Qwen2 with ``max_window_layers=1``: layer 0 attends fully, layer 1 through a window of 4
    (``config.layer_types``, as Gemma-2/3 alternate them). Both layouts equal the plain forward (log-probs
    and gradients); windowing every layer, as the padded layout did, is measurably off."""
    from alignexp.models import logprobs

    model = tiny_model(tokenizer, model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=1, num_key_value_heads=2).train()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    batch_examples = window_examples()
    expected, grads = plain_logps_and_grads(model, batch_examples)
    batch = pack(batch_examples, pad_id=PAD)
    batch = batch if layout == "padding-free" else dataclasses.replace(batch, flat=None)
    block_calls.clear()
    assert_packed_equals_plain(model, batch, expected, grads)
    assert block_calls == ([None, WINDOW] if layout == "padding-free" else [])
    monkeypatch.setattr(logprobs, "layer_windows", lambda config: None)  # one window for every layer
    with torch.no_grad():
        assert (sequence_logps(model, dataclasses.replace(batch, flat=None))[0] - expected).abs().max() > 1e-3


def test_attention_softcapping_runs_padding_free(tokenizer, block_calls):
    """Gemma-2's attention soft-capping (the layer passes ``softcap``) is computed by block attention as by
    the model's eager attention: the padding-free forward serves it (it took the padded one before)."""
    model = tiny_model(tokenizer, "eager", model_type="gemma2", head_dim=32, num_key_value_heads=2,
                       attn_logit_softcapping=1.0, final_logit_softcapping=None, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"], initializer_range=0.3).train()
    assert padding_free_supported(model.get_decoder())
    batch_examples = window_examples()
    expected, grads = plain_logps_and_grads(model, batch_examples)
    block_calls.clear()
    logps = sequence_logps(model, pack(batch_examples, pad_id=PAD))[0]
    torch.testing.assert_close(logps.detach(), expected, atol=1e-4, rtol=0)
    logps.sum().backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-3)
    assert block_calls == [WINDOW, None]
    uncapped = tiny_model(tokenizer, "eager", model_type="gemma2", head_dim=32, num_key_value_heads=2,
                          attn_logit_softcapping=None, final_logit_softcapping=None, sliding_window=WINDOW,
                          layer_types=["sliding_attention", "full_attention"], initializer_range=0.3)
    with torch.no_grad():
        assert (sequence_logps(uncapped, pack(batch_examples, pad_id=PAD))[0] - expected).abs().max() > 1e-2


class AttentionSpy:
    """Records (query dtype, mask dtype) of every ``scaled_dot_product_attention`` call with a mask."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.dtype, torch.dtype]] = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, *args, **kwargs):
            if attn_mask is not None:
                self.calls.append((query.dtype, attn_mask.dtype))
            return real(query, key, value, attn_mask, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def assert_query_dtype(self, dtype: torch.dtype) -> None:
        """Every mask is bool or of the query's dtype, and the queries were of ``dtype``."""
        assert self.calls and {q for q, _ in self.calls} == {dtype}
        assert all(m in (torch.bool, q) for q, m in self.calls), self.calls


@pytest.mark.parametrize("layout", ["padding-free", "padded"])
def test_masks_have_the_querys_dtype_under_bf16_autocast(tokenizer, layout, monkeypatch):
    """fp32 parameters computing in bf16 (autocast here; FSDP2's MixedPrecisionPolicy on a GPU, where
    ``model.dtype`` stays fp32): the masks reaching SDPA are bool or bf16 like the query (CUDA's
    memory-efficient kernel refuses a mask of another dtype), in the forward and its recomputation."""
    model = build_model(ModelArgs(arch={"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                        "n_positions": 128}, attn_implementation="sdpa"), tokenizer).train()
    hf_checkpointing(model)
    batch = pack(window_examples(), pad_id=PAD)
    spy = AttentionSpy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = sequence_logps(model, batch if layout == "padding-free" else dataclasses.replace(batch, flat=None))[0]
    logps.sum().backward()
    assert model.dtype == torch.float32 and logps.dtype == torch.float32
    spy.assert_query_dtype(torch.bfloat16)


FSDP_SCRIPT = r"""
import dataclasses, json, os, sys, tempfile
import torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
sys.path.insert(0, os.getcwd())
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample, pack, sequence_logps

dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
tokenizer = build_tokenizer(ModelArgs())
model = build_model(ModelArgs(arch={"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "sliding_window": 4}, attn_implementation="sdpa"), tokenizer)
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for layer in model.get_decoder().layers:
    fully_shard(layer, mp_policy=policy)
fully_shard(model.get_decoder(), mp_policy=policy)
fully_shard(model.get_output_embeddings(), mp_policy=policy)
calls = []
real = torch.nn.functional.scaled_dot_product_attention
def spy(q, k, v, attn_mask=None, *a, **kw):
    if attn_mask is not None:
        calls.append([str(q.dtype), str(attn_mask.dtype)])
    return real(q, k, v, attn_mask, *a, **kw)
torch.nn.functional.scaled_dot_product_attention = spy
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()
batch = pack([EncodedExample([257] + ids(9), [ids(7) + [258], ids(3) + [258]]),
              EncodedExample([257] + ids(5), [ids(6) + [258]])], pad_id=256)
out = {}
for layout, b in (("padding-free", batch), ("padded", dataclasses.replace(batch, flat=None))):
    calls.clear()
    logps = sequence_logps(model, b)[0]
    logps.sum().backward()
    out[layout] = {"calls": list(calls), "logps": str(logps.dtype), "model": str(model.dtype)}
print("RESULT", json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.slow  # a process of its own: about 20 s on a loaded 2-core machine
def test_masks_have_the_querys_dtype_under_fsdp2_mixed_precision(tmp_path):
    """The case itself: ``fully_shard`` with a bf16 ``MixedPrecisionPolicy`` (one gloo process): the
    parameters (and ``model.dtype``) stay fp32, queries are bf16, and every mask reaching SDPA is bool or
    bf16 on both layouts."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    for layout, seen in out.items():
        assert seen["model"] == "torch.float32" and seen["logps"] == "torch.float32", layout
        assert seen["calls"] and all(q == "torch.bfloat16" for q, _ in seen["calls"]), (layout, seen)
        assert all(m in ("torch.bool", "torch.bfloat16") for _, m in seen["calls"]), (layout, seen)
