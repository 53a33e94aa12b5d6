"""Attention of the padding-free shared-prefix forward (:func:`flat_forward`; layout in ``logprobs.py``).

The decoder runs on one row of the batch's N real tokens. Under SDPA, FlashAttention-2 and eager
models, each layer's attention call carries the layout as keyword arguments, and a router registered
over the model's own attention implementation sends such calls to :func:`block_attention` (the prompts
causally, the responses against their block's keys under a mask, blocks of similar length grouped) and
every other call to the implementation itself. Nothing is switched for the duration of the forward, so
a layer recomputed in backward (transformers' gradient checkpointing, torch's ``checkpoint_wrapper`` as
FSDP and Lightning apply it) takes the same path. The layer's own sliding window (the
``sliding_window`` each layer passes: one for every layer in Mistral, per kind of layer where
``config.layer_types`` mixes sliding and full layers, as Gemma-2/3 do) is added to the block rule over
position ids, and the layer's attention soft-capping (Gemma-2's ``softcap``) is computed as its eager
attention does (:func:`softcapped_attention`). The masks are built in the query's dtype (under FSDP2's
mixed precision it is bf16 while ``model.dtype`` is fp32). A model whose layers drop the layout's
keyword arguments (Falcon) never reaches the router: :func:`flat_forward` notices
(:class:`LayoutNotReached`) and the model takes the padded layout from then on. Models built with
``flex_attention`` get FlexAttention ``BlockMask`` s of the same rule instead: empty blocks are skipped
by the kernel. Whether a model's log-probs are exact in each layout is checked at build
(:mod:`alignexp.models.parity`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass
class AttentionBucket:
    """A group of ``rows`` blocks whose attention runs as two SDPA calls (see :func:`block_attention`).

    Each block is one row of ``width`` keys (its tokens, padded), the first ``prompt`` of which are
    enough to hold its prompt; its response tokens are one row of ``responses`` queries. ``mask``
    (rows, 1, responses, width) bool: True where a response token may attend a key of its block.
    """

    rows: int
    width: int
    prompt: int
    responses: int
    mask: Tensor

    def to(self, device: torch.device | str) -> AttentionBucket:
        return AttentionBucket(self.rows, self.width, self.prompt, self.responses, self.mask.to(device))


@dataclass
class FlatLayout:
    """Where the tokens of a ``PackedBatch`` go in the padding-free forward.

    Shapes (N real tokens, block after block in example order): ``token_index`` (N,): flat index into
    the padded (R*T) layout of each token; ``source``: like ``PackedBatch.source_index``, but indexing
    the N tokens; ``key_index`` (sum of rows x width): the tokens of each block's key row, bucket after
    bucket; ``query_index`` (sum of rows x responses): the response tokens of each block's query row
    (padded slots of both read token 0: no query attends them, and their outputs are dropped);
    ``buckets``: the attention calls (:class:`AttentionBucket`); ``order`` (N,): where each token's
    attention output is in the concatenation, bucket after bucket, of the prompt call's outputs (rows x
    prompt) and the response call's (rows x responses); ``document`` (N,): each token's block (example);
    ``segment`` (N,): 0 in the prompt, k + 1 in the block's k-th response.
    """

    token_index: Tensor
    source: Tensor
    key_index: Tensor
    query_index: Tensor
    buckets: list[AttentionBucket]
    order: Tensor
    document: Tensor
    segment: Tensor

    def to(self, device: torch.device | str) -> FlatLayout:
        moved = {k: ([b.to(device) for b in v] if k == "buckets" else v.to(device)) for k, v in self.__dict__.items()}
        return FlatLayout(**moved)


def additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The bool mask (True = may attend) as an additive one: 0 where allowed, ``dtype``'s minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


# -- which models, and how ---------------------------------------------------------------------------------
def activation_checkpointing(decoder) -> bool:
    """Whether ``decoder``'s layers recompute their activations in backward: transformers' gradient
    checkpointing (``layer.gradient_checkpointing``, also DeepSpeed's through it) or torch's
    ``checkpoint_wrapper`` (``apply_activation_checkpointing``, what FSDP and Lightning apply)."""
    return any(getattr(m, "gradient_checkpointing", False) is True or hasattr(m, "_checkpoint_wrapped_module")
               for m in decoder.modules())


def _registered(implementation: str) -> bool:
    from transformers.modeling_utils import AttentionInterface

    return implementation in AttentionInterface._global_mapping


PADDED_ONLY = "_alignexp_padded_only"
"""Attribute set on a decoder whose padding-free forward is not exact (its layers drop the layout's keyword
arguments, or the parity probe of :mod:`alignexp.models.parity` found it off): it takes the padded layout."""


def padding_free_supported(decoder) -> bool:
    """Whether :func:`flat_forward` can run ``decoder``: not where the parity probe or a forward found the
    layout does not reach its attention (:data:`PADDED_ONLY`), nor an eager model that checkpoints
    activations (the padding-free forward runs an eager model's attention under the SDPA name, which its
    recomputation in backward would not)."""
    if getattr(decoder, PADDED_ONLY, False):
        return False
    return _registered(decoder.config._attn_implementation) or not activation_checkpointing(decoder)


def use_padded_layout(decoder, reason: str) -> None:
    """Make ``decoder`` take the padded layout from now on, saying why once."""
    if not getattr(decoder, PADDED_ONLY, False):
        log.warning("%s: the padding-free layout is not exact for this model (%s); it uses the padded layout",
                    architecture_name(decoder.config), reason)
    object.__setattr__(decoder, PADDED_ONLY, True)


def architecture_name(config) -> str:
    """``model_type`` and class, as messages name an architecture: ``falcon (FalconForCausalLM)``."""
    classes = getattr(config, "architectures", None) or []
    return f"{getattr(config, 'model_type', '?')}" + (f" ({classes[0]})" if classes else "")


def route_block_calls(implementation: str) -> None:
    """Make the ``implementation`` entry of transformers' attention registry send calls that carry a block
    layout (``block_layout=...``) to :func:`block_attention`, and, for SDPA, soft-capped calls to
    :func:`softcapped_attention_forward` (the padded rows of a model run under SDPA's name); other calls
    go where they went (idempotent)."""
    from transformers.modeling_utils import AttentionInterface

    current = AttentionInterface._global_mapping[implementation]
    if getattr(current, "routes_block_calls", False):
        return

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get("block_layout") is not None:
            return block_attention(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("softcap") is not None and implementation == "sdpa":  # SDPA cannot soft-cap: eager maths
            return softcapped_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        return current(module, query, key, value, attention_mask, *args, **kwargs)

    attention.routes_block_calls = True
    # keep the FlashAttention-2 router's mark, so that it is not put back around this one
    attention.routes_block_masks_to_sdpa = getattr(current, "routes_block_masks_to_sdpa", False)
    AttentionInterface._global_mapping[implementation] = attention


def sliding_window(config) -> int | None:
    """The model's sliding window when its layers use one (Mistral; Qwen2 with ``use_sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


LAYER_TYPES = ("full_attention", "sliding_attention")
"""The per-layer attention kinds (``config.layer_types``) that both layouts implement."""


def layer_windows(config) -> dict[str, int | None] | None:
    """The window of each kind of layer where the model mixes kinds (``config.layer_types``: Gemma-2 and -3
    alternate sliding and full layers, Qwen2/3 and SmolLM3 slide above ``max_window_layers`` or on their
    no-RoPE layers): ``{"full_attention": None, "sliding_attention": window}``, the kinds it has. None when
    every layer is alike (then :func:`sliding_window` is the window of all of them). An unknown kind
    (chunked attention, ...) raises ValueError naming it."""
    types = getattr(config, "layer_types", None)
    if not types:
        return None
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"{architecture_name(config)}: layer_types {unknown} are not supported by alignexp's "
                         f"log-prob layouts (only {', '.join(LAYER_TYPES)})")
    window = getattr(config, "sliding_window", None)
    return {kind: (int(window) if kind == "sliding_attention" and window is not None else None)
            for kind in dict.fromkeys(types)}


# -- the forward -------------------------------------------------------------------------------------------
class BucketMasks:
    """Per-window attention masks of a layout's buckets, built once per forward and shared by every layer
    (and its recomputation). ``masks(window, dtype)``: per bucket (prompt mask or None for plain causal,
    response mask), additive in ``dtype``, the dtype of the query they meet (under FSDP2's mixed precision
    the parameters, and so ``model.dtype``, are fp32 while attention computes in bf16, and CUDA's
    memory-efficient kernel refuses a mask of another dtype than the query's); with a window, key and query
    positions farther apart than it are masked. ``calls`` counts the attention calls that used them: a
    forward that made none never reached :func:`block_attention` (its layers drop the layout)."""

    def __init__(self, layout: FlatLayout, positions: Tensor):
        self.layout, self.positions = layout, positions
        self.built: dict[tuple[int | None, torch.dtype], list[tuple[Tensor | None, Tensor]]] = {}
        self.calls = 0

    def __call__(self, window: int | None, dtype: torch.dtype) -> list[tuple[Tensor | None, Tensor]]:
        self.calls += 1
        if (window, dtype) not in self.built:
            self.built[window, dtype] = self._build(window, dtype)
        return self.built[window, dtype]

    def _build(self, window: int | None, dtype: torch.dtype) -> list[tuple[Tensor | None, Tensor]]:
        layout, out = self.layout, []
        keys = self.positions.index_select(0, layout.key_index).split([b.rows * b.width for b in layout.buckets])
        queries = self.positions.index_select(0, layout.query_index).split(
            [b.rows * b.responses for b in layout.buckets])
        for bucket, key_pos, query_pos in zip(layout.buckets, keys, queries):
            mask, prompt = bucket.mask, None
            if window is not None:
                gap = query_pos.view(bucket.rows, 1, -1, 1) - key_pos.view(bucket.rows, 1, 1, -1)
                mask = mask & (gap < window)
                if bucket.prompt > window:  # prompt positions are 0..P-1 in every row: one banded mask
                    at = torch.arange(bucket.prompt, device=mask.device)
                    gap = at[:, None] - at[None, :]
                    prompt = additive_mask((gap >= 0) & (gap < window), dtype)
            out.append((prompt, additive_mask(mask, dtype)))
        return out


class LayoutNotReached(RuntimeError):
    """The padding-free forward never reached :func:`block_attention`: the model's layers do not pass the
    layout's keyword arguments on to their attention (Falcon's)."""


def flat_forward(decoder, input_ids: Tensor, position_ids: Tensor, layout: FlatLayout) -> Tensor:
    """The decoder's last hidden states ``(1, N, H)`` of one padding-free row (``input_ids``, ``position_ids``
    (1, N)) whose attention follows ``layout``: through FlexAttention ``BlockMask``s for ``flex_attention``
    models, else through :func:`block_attention` (see the module docstring). Raises
    :class:`LayoutNotReached` when the layers never passed the layout to their attention."""
    implementation = decoder.config._attn_implementation
    if implementation == "flex_attention":
        kinds = layer_windows(decoder.config)
        if kinds is None:
            mask = flex_block_mask(layout, position_ids[0], sliding_window(decoder.config))
        else:  # one BlockMask per kind of layer (the models with layer_types take a mapping)
            mask = {kind: flex_block_mask(layout, position_ids[0], window) for kind, window in kinds.items()}
        return decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                       use_cache=False).last_hidden_state
    marker = torch.zeros((1, 1, 0, 0), dtype=torch.bool, device=input_ids.device)  # a 4D mask: used as given
    masks = BucketMasks(layout, position_ids[0])
    kwargs = {"block_layout": layout, "block_masks": masks}
    try:
        if _registered(implementation):
            route_block_calls(implementation)
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=marker, use_cache=False,
                             **kwargs).last_hidden_state
        else:
            hidden = _eager_flat_forward(decoder, input_ids, position_ids, marker, kwargs)
    except (RuntimeError, ValueError, TypeError) as error:
        if masks.calls == 0:
            raise LayoutNotReached(f"its layers did not pass the block layout to their attention ({error})") from error
        raise
    if masks.calls == 0:
        raise LayoutNotReached("its layers did not pass the block layout to their attention")
    return hidden


def _eager_flat_forward(decoder, input_ids: Tensor, position_ids: Tensor, marker: Tensor, kwargs) -> Tensor:
    """An eager model's padding-free forward: its function is the model's own, outside the registry, so the
    SDPA entry's router serves instead for the duration of the call."""
    with attention_implementation_as(decoder, "sdpa"):
        return decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=marker, use_cache=False,
                       **kwargs).last_hidden_state


@contextmanager
def attention_implementation_as(decoder, implementation: str) -> Iterator[None]:
    """``decoder`` (each config in it) runs its attention through the registry's ``implementation`` entry for
    the duration, routed as :func:`route_block_calls` routes it (block layouts, soft-capping)."""
    route_block_calls(implementation)
    configs = {id(m.config): m.config for m in decoder.modules() if hasattr(getattr(m, "config", None),
                                                                           "_attn_implementation")}
    previous = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = implementation
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = previous[key]


def softcapped_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: float = 0.0,
                         scale: float | None = None, softcap: float | None = None, causal: bool = False,
                         training: bool = False) -> Tensor:
    """``softmax(softcap * tanh(q k^T * scale / softcap) + mask) v``, as transformers' eager attention of
    Gemma-2 computes it (the scores soft-capped before the mask, the softmax in fp32); SDPA has no
    soft-capping. ``query`` (..., Lq, D), ``key``/``value`` (..., Lk, D) with as many heads; ``mask``:
    additive or bool (True = may attend), broadcastable to the scores; ``causal``: a causal mask instead."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value)


def softcapped_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-function signature over :func:`alignexp.models.attention.softcapped_attention`
    (``query`` (B, H, T, D), key/value (B, H_kv, T, D)); returns ((B, T, H, D), None)."""
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    mask = attention_mask[:, :, :, :key.shape[-2]] if attention_mask is not None else None
    out = softcapped_attention(query, key, value, mask, dropout, scaling, softcap, training=dropout > 0)
    return out.transpose(1, 2).contiguous(), None


def block_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None, block_layout: FlatLayout | None = None,
                    block_masks: BucketMasks | None = None, sliding_window: int | None = None,
                    softcap: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """Attention of a padding-free row, block by block (transformers' attention-function signature).

    ``query`` (1, H, N, D), ``key``/``value`` (1, H_kv, N, D): the N tokens of ``block_layout``. The
    tokens are gathered once into the blocks' key rows (and the responses' query rows); then, per
    bucket (:class:`AttentionBucket`), two SDPA calls: the prompts, causal (``is_causal``, so the
    kernel skips the upper triangle; a banded mask when a ``sliding_window`` is shorter than the
    prompts), and the response tokens against all the keys of their block under ``block_masks`` (built
    in the query's dtype). Attention so costs about P^2/2 + L*W per block (prompt P, responses L, block
    W = P + L) instead of the W^2 of a dense mask. The layer's own ``sliding_window`` and ``softcap``
    (Gemma-2's attention soft-capping, by :func:`softcapped_attention`) apply. The outputs are put back
    in token order. Returns ((1, N, H, D), None).
    """
    if block_layout is None or block_masks is None:
        raise RuntimeError("block_attention runs only inside alignexp.models.attention.flat_forward, which passes "
                           "the block layout")
    heads, dim = query.shape[1], query.shape[3]
    if key.shape[1] != heads:  # grouped-query attention: one key/value head per group of query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = query[0], key[0], value[0]  # (H, N, D)
    buckets = block_layout.buckets
    key_sizes = [b.rows * b.width for b in buckets]
    # one gather per tensor for all buckets, then a split (whose backward is one concatenation)
    q_keys, k_keys, v_keys = (t.index_select(1, block_layout.key_index).split(key_sizes, dim=1) for t in (q, k, v))
    q_responses = q.index_select(1, block_layout.query_index).split([b.rows * b.responses for b in buckets], dim=1)
    if softcap is None:
        def attend(q_, k_, v_, mask, causal):
            return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, dropout_p=dropout,
                                                                    is_causal=causal, scale=scaling)
    else:
        def attend(q_, k_, v_, mask, causal):
            return softcapped_attention(q_, k_, v_, mask, dropout, scaling, softcap, causal, training=dropout > 0)
    outputs = []
    for i, (bucket, (prompt_mask, mask)) in enumerate(zip(buckets, block_masks(sliding_window, query.dtype))):
        r, w, p, n = bucket.rows, bucket.width, bucket.prompt, bucket.responses

        def rows(t: Tensor, length: int, r: int = r) -> Tensor:  # (H, r * length, D) -> (r, H, length, D)
            return t.view(heads, r, length, dim).transpose(0, 1)

        qb, kb, vb = rows(q_keys[i], w), rows(k_keys[i], w), rows(v_keys[i], w)
        prompts = attend(qb[:, :, :p], kb[:, :, :p], vb[:, :, :p], prompt_mask, prompt_mask is None)
        outputs.append(prompts.transpose(0, 1).reshape(heads, r * p, dim))
        if n > 0:
            responses = attend(rows(q_responses[i], n), kb, vb, mask, False)
            outputs.append(responses.transpose(0, 1).reshape(heads, r * n, dim))
    out = torch.cat(outputs, dim=1).index_select(1, block_layout.order)  # (H, N, D) in token order
    return out.transpose(0, 1)[None].contiguous(), None


# -- FlexAttention -------------------------------------------------------------------------------------------
def flex_block_mask(layout: FlatLayout, positions: Tensor, window: int | None = None):
    """A FlexAttention ``BlockMask`` (1, 1, N, N) of the padding-free row: query t may attend key s when both
    are in one example, s <= t, and s is in the prompt or in t's own response; with a ``window``, also
    ``position[t] - position[s] < window`` (transformers' sliding-window rule, over position ids, which
    restart after the prompt for each response). Blocks of the N x N grid that no query may attend are
    skipped by ``flex_attention``."""
    from torch.nn.attention.flex_attention import create_block_mask

    document, segment = layout.document, layout.segment

    def may_attend(b, h, q, kv):
        allowed = (document[q] == document[kv]) & (kv <= q) & ((segment[kv] == 0) | (segment[kv] == segment[q]))
        if window is not None:
            allowed = allowed & (positions[q] - positions[kv] < window)
        return allowed

    n = document.shape[0]
    return create_block_mask(may_attend, None, None, n, n, device=document.device)
