"""The parity probe: a model built from any folder or hub id meets the log-prob contract or is refused
(contract in ../DESIGN.md).

At build (:func:`alignexp.models.backbone.build_model`), on one short batch, the summed response
log-probs of both layouts of :func:`alignexp.models.logprobs.sequence_logps` (padding-free and padded)
are compared with the model's own plain forward (``prompt + response`` through ``model(...)``, its
masks, attention and final soft-capping, its head). The model's sliding windows are shrunk to
:data:`PROBE_WINDOW` for the probe, so that its short sequences are longer than every window and each
kind of layer (sliding, full) is exercised. Beyond :func:`tolerance`:

* the padding-free layout: the model takes the padded layout from then on, with a warning;
* the padded layout: the run is refused (:class:`UnsupportedModel`), naming the architecture.

The verdict is kept per architecture, dtype and attention implementation for the process, so the
reference built after the policy is not probed again. ``model.parity_probe=false`` skips it (logged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from alignexp.errors import AlignexpError
from alignexp.models.attention import (
    LayoutNotReached,
    architecture_name,
    attention_implementation_as,
    padding_free_supported,
    use_padded_layout,
)
from alignexp.models.logprobs import EncodedExample, pack, sequence_logps

log = logging.getLogger(__name__)

PROBE_WINDOW = 4
"""The sliding window the probe gives the model: shorter than every probe sequence and prompt."""

PROMPTS = (5, 7)
RESPONSES = 7
"""Probe batch: two prompts, two responses each, every prompt + response of equal length (so the plain
forward is one batch without padding): 5 + 7 and 7 + 5 tokens, all longer than :data:`PROBE_WINDOW`."""


class UnsupportedModel(AlignexpError):
    """The model's log-probs cannot be computed exactly by alignexp (the parity probe found them off)."""


@dataclasses.dataclass
class ProbeResult:
    """Largest per-token error (nats, averaged over each response) of each layout against the plain
    forward; ``padding_free`` is None where that layout does not run for this model."""

    padded: float
    padding_free: float | None
    tolerance: float
    seconds: float


_VERDICTS: dict[tuple, bool] = {}
"""Per architecture (config), dtype, attention and device: whether the padding-free layout was exact."""


UPCAST_BYTES = 4 * 2**30
"""A 16-bit model whose fp32 copy takes at most this is probed in fp32 (its weights cast in place and back,
exactly): the layouts are checked, not bf16's rounding, which moves log-probs of random tokens by ~0.1
nats. Larger models are probed in their own dtype, with :func:`tolerance`'s wider bound."""


def tolerance(dtype: torch.dtype) -> float:
    """Largest mean per-token log-prob error allowed: 1e-3 nats in fp32 (exact paths differ by ~1e-6),
    0.2 in 16-bit (rounding in a different order of reduction: ~0.1 on SmolLM2-135M in bf16). The errors
    the probe exists for are of 0.1 to 1 nat per token: in 16-bit, only the larger are caught."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 0.2


@contextmanager
def in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """``model``'s 16-bit parameters and buffers in fp32 for the duration, then back to their own dtypes
    (16 -> 32 -> 16 bits is exact); nothing happens to a model already in fp32 or too large
    (:data:`UPCAST_BYTES`)."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.dtype in (torch.bfloat16, torch.float16)]
    if not tensors or sum(t.numel() for t in model.parameters()) * 4 > UPCAST_BYTES:
        yield
        return
    dtypes = [t.dtype for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.float()
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)


def probe_examples(vocab: int, seed: int = 0) -> list[EncodedExample]:
    """The probe batch (:data:`PROMPTS`, :data:`RESPONSES`): seeded token ids below ``vocab``."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    length = PROMPTS[0] + RESPONSES
    return [EncodedExample(ids(p), [ids(length - p), ids(length - p)]) for p in PROMPTS]


@contextmanager
def shrunk_windows(model: torch.nn.Module, window: int) -> Iterator[bool]:
    """The model's sliding windows set to ``window`` for the duration: its configs' ``sliding_window`` and
    each module's own copy (attention layers keep one). Yields whether the model has a window at all."""
    changed: list[tuple[object, int]] = []
    configs = {id(c): c for c in [getattr(model, "config", None)] +
               [getattr(m, "config", None) for m in model.modules()] if c is not None}
    for config in list(configs.values()):
        if hasattr(config, "get_text_config"):
            text = config.get_text_config()
            configs[id(text)] = text
    targets = list(configs.values()) + list(model.modules())
    try:
        for target in targets:
            current = target.__dict__.get("sliding_window") if hasattr(target, "__dict__") else None
            if isinstance(current, int) and not isinstance(current, bool) and current > window:
                changed.append((target, current))
                object.__setattr__(target, "sliding_window", window)
        yield bool(changed)
    finally:
        for target, value in changed:
            object.__setattr__(target, "sliding_window", value)


def plain_logps(model, examples: list[EncodedExample]) -> Tensor:
    """Summed response log-probs, each prompt + response through the model's own forward, in one batch (the
    probe's sequences are of equal length). A FlexAttention model's own forward runs under SDPA (the same
    causal and windowed attention; FlexAttention's compilation of transformers' own masks fails on the CPU
    with torch 2.13), so its padding-free layout, under alignexp's BlockMasks, is checked against SDPA."""
    rows, prompt_lens, responses = [], [], []
    for ex in examples:
        for response in ex.response_ids:
            rows.append(ex.prompt_ids + response)
            prompt_lens.append(len(ex.prompt_ids))
            responses.append(response)
    device = next(model.parameters()).device
    ids = torch.tensor(rows, device=device)
    flex = model.config._attn_implementation == "flex_attention"
    with attention_implementation_as(model, "sdpa") if flex else contextlib.nullcontext():
        logits = model(input_ids=ids, use_cache=False).logits
    logps = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (p, response) in enumerate(zip(prompt_lens, responses)):
        targets = torch.tensor(response, device=device)
        out.append(logps[i, p - 1:p - 1 + len(response)].gather(1, targets[:, None]).sum())
    return torch.stack(out).view(len(examples), -1)


def _verdict_key(model) -> tuple:
    config = model.config
    return (type(model).__name__, config.to_json_string(use_diff=False), str(model.dtype),
            config._attn_implementation, next(model.parameters()).device.type)


@torch.no_grad()
def check_layouts(model, name: str) -> ProbeResult:
    """Run the probe on ``model`` (named ``name`` in messages); see the module docstring. Raises
    :class:`UnsupportedModel` when the padded layout is off; switches the model to the padded layout
    (warning) when only the padding-free one is."""
    decoder = model.get_decoder()
    key = _verdict_key(model)
    if key in _VERDICTS:
        if not _VERDICTS[key]:
            use_padded_layout(decoder, "parity probe, as for the model built before")
        return ProbeResult(0.0, None, tolerance(model.dtype), 0.0)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    arch = architecture_name(model.config)
    vocab = model.get_output_embeddings().weight.shape[0]
    examples = probe_examples(vocab)
    batch = pack(examples, pad_id=0).to(next(model.parameters()).device)
    lengths = batch.lengths.float()
    try:
        with shrunk_windows(model, PROBE_WINDOW), in_fp32(model):
            limit = tolerance(model.dtype)
            expected = plain_logps(model, examples)

            def error(b) -> float:
                return float(((sequence_logps(model, b)[0] - expected).abs() / lengths).max())

            padded = error(dataclasses.replace(batch, flat=None))
            free = None
            if padding_free_supported(decoder):
                try:
                    free = error(batch)
                except LayoutNotReached as failure:  # response_states falls back itself; this is its message
                    use_padded_layout(decoder, str(failure))
                if not padding_free_supported(decoder):
                    free = None
    finally:
        model.train(was_training)
    result = ProbeResult(padded, free, limit, time.perf_counter() - start)
    if padded > limit:
        raise UnsupportedModel(
            f"model {name}: {arch} with attention {model.config._attn_implementation}: its log-probs in alignexp's "
            f"padded layout differ from its own forward by {padded:.3g} nats per token (tolerance {limit:g}), so "
            f"training would use wrong log-probs. Use another attention implementation (model.attn_implementation="
            f"eager) or another architecture; model.parity_probe=false skips this check at your own risk.")
    if free is not None and free > limit:
        use_padded_layout(decoder, f"parity probe: {free:.3g} nats per token off, tolerance {limit:g}")
    _VERDICTS[key] = padding_free_supported(decoder)
    layouts = (f"padding-free {free:.1e}, " if free is not None and free <= limit else
               "padding-free not used, ")
    log.info("parity probe of %s (%s): %spadded %.1e nats per token off the plain forward (tolerance %g), %.2fs",
             name, arch, layouts, padded, limit, result.seconds)
    return result
