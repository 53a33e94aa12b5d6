"""The one place that computes sequence log-probabilities (contract in ../DESIGN.md).

**Shared-prefix packing.** An example (a prompt and its n responses) is laid out as one block
``[prompt | response_1 | ... | response_n]`` under a block attention mask in which every response
sees the prompt and its own earlier tokens, never another response. Position ids restart after the
prompt for each response, so each response is computed exactly as if it followed the prompt alone,
while the prompt's tokens are computed once for all n responses. The first token of every response
is predicted from the prompt's last hidden state. One forward per batch.

**Padding-free forward** (:class:`FlatLayout`, used by :func:`response_states`). The decoder runs on
one row of the batch's N real tokens, with no padding: embeddings, projections, MLPs and norms see
each token once. Only attention works in rows (``alignexp/models/attention.py``): each block is one
row, the prompts run causally and the response tokens against their block's keys under its mask,
blocks of similar length grouped into a few calls (:func:`length_buckets`), so attention costs about
P^2/2 + L*W per block (prompt P, response tokens L, block W) rather than the W^2 of a dense mask. It
is the path with activation checkpointing, sliding windows (per layer where the model mixes sliding
and full layers) and attention soft-capping too; eager attention with checkpointing, and models whose
layers do not pass the layout on to their attention (found at build by :mod:`alignexp.models.parity`,
or at the first forward), take the padded path below.

**Padded layout** (``input_ids``, ``position_ids``, ``attention_mask``: what other modules feed to
a decoder themselves, and the fallback). The blocks are packed into R <= B rows of T tokens,
first-fit decreasing, T being the longest block (or ``row_budget``): short examples share a row
instead of each being padded to the longest one, and blocks in one row never see each other. The
model's sliding windows are added to the mask, per kind of layer (:func:`padded_masks`).

**Head.** Only the hidden states that predict response tokens go through the output head, in chunks
of at most :data:`LOGIT_CHUNK` logits (:func:`chunked_token_logps`): the fp32 log-softmax over the
vocabulary never exists for all response tokens at once, in the forward or the backward. The model's
final logit soft-capping (Gemma-2, Gemma-3) applies to each chunk, as in its own forward.
"""
from __future__ import annotations

import array
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alignexp.models.attention import (  # noqa: F401  (additive_mask, padding_free_supported: part of this API)
    AttentionBucket,
    FlatLayout,
    LayoutNotReached,
    additive_mask,
    attention_implementation_as,
    flat_forward,
    layer_windows,
    padding_free_supported,
    sliding_window,
    use_padded_layout,
)
from alignexp.tasks.base import RankedExample, Text


@dataclass
class EncodedExample:
    """Token ids of one prompt and its responses (responses end with EOS)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    target_ids: list[int] | None = None
    scores: list[float] | None = None


@dataclass
class PackedBatch:
    """Model inputs for shared-prefix packing, plus where each response token lives.

    B examples with n response slots each, packed into R <= B rows of T tokens (see the module
    docstring). Shapes: ``input_ids``, ``position_ids``: (R, T); ``attention_mask``: (R, 1, T, T) bool
    (True = may attend); ``source_index``: (N,) flat index into (R*T) of the state that predicts each
    response token; ``target_ids``: (N,); ``slot``: (N,) flat index into (B*n) of the response each
    token belongs to; ``lengths``: (B, n) response tokens; ``mask``: (B, n) bool; ``rewards``: (B, n)
    scores (NaN where absent) when every example has scores; ``ref_logps``: (B, n) precomputed
    reference log-probs when the collator has them; ``flat``: the padding-free layout of the same
    tokens (:class:`FlatLayout`; None makes :func:`response_states` use the padded layout). ``flat.source``
    is aligned with ``source_index``: code that reorders the response tokens must reorder both.

    The N response tokens are listed response by response (slot order), each response's tokens in
    order; an example's responses follow its prompt contiguously in slot order (empty slots take no
    room). So ``source_index`` grows along a response, and response k of example b ends at flat index
    ``prompt_last + lengths[b, :k+1].sum()``, ``prompt_last`` being the source index of its first token.
    """

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    source_index: Tensor
    target_ids: Tensor
    slot: Tensor
    lengths: Tensor
    mask: Tensor
    rewards: Tensor | None = None
    ref_logps: Tensor | None = None
    flat: FlatLayout | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.lengths.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, (Tensor, FlatLayout)) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def encode_text(tokenizer, text: Text, *, is_prompt: bool) -> list[int]:
    """Token ids of a prompt (BOS first, chat template for messages) or a response (EOS last).

    The prompt/response boundary: a prompt and each of its responses are tokenised apart, so a response's ids
    do not depend on its prompt and the prompt's ids are those the policy is given when it samples. Tokenising
    prompt + response together (as TRL 1.16 does, cutting at the longest common prefix with the prompt alone)
    can give other ids where a BPE tokenizer merges across the boundary (a prompt ending in a space, a word
    running on into the response). Sampled responses are not re-tokenised: they keep the ids that were sampled
    (:class:`alignexp.tasks.base.SampledText`, :func:`alignexp.lightning_modules.datamodule.encode_all`).
    """
    if isinstance(text, list):
        if is_prompt:
            return list(tokenizer.apply_chat_template(text, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
        text = "".join(m["content"] for m in text if m.get("role") == "assistant") or \
            "".join(m["content"] for m in text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if is_prompt:
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    return ids + [tokenizer.eos_token_id]


def encode_example(tokenizer, example: RankedExample, max_prompt_len: int, max_response_len: int,
                   with_target: bool = False) -> EncodedExample:
    """Tokenise one example: the prompt truncated from the left, each response capped on the right."""
    prompt = encode_text(tokenizer, example.prompt, is_prompt=True)[-max_prompt_len:]
    responses = [encode_text(tokenizer, r, is_prompt=False)[:max_response_len] for r in example.responses]
    target = None
    if with_target:
        source = example.target if example.target is not None else example.responses[0]
        target = encode_text(tokenizer, source, is_prompt=False)[:max_response_len]
    return EncodedExample(prompt, responses, target, example.scores)


def pack(examples: Sequence[EncodedExample], n: int | None = None, pad_id: int = 0,
         with_target: bool = False, row_budget: int | None = None) -> PackedBatch:
    """Lay out B encoded examples as shared-prefix blocks packed into rows (see the module docstring).

    ``n`` is the number of response slots (default: the longest list); shorter lists, and empty
    responses, are masked. With ``with_target``, the example's target response is one more slot
    (column n). ``row_budget``: tokens per row; rows are as wide as the longest block when it is
    None or smaller (a block is never split).
    """
    if len(examples) == 0:
        raise ValueError("pack: no examples to pack")
    n_responses = n if n is not None else max(len(ex.response_ids) for ex in examples)
    n_slots = n_responses + int(with_target)
    blocks: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
    for b, ex in enumerate(examples):
        if len(ex.prompt_ids) == 0:
            raise ValueError(f"pack: example {b} has no prompt tokens; a response's first token is predicted "
                             "from the prompt's last state")
        if len(ex.response_ids) > n_responses:
            raise ValueError(f"pack: example {b} has {len(ex.response_ids)} responses, more than n={n_responses}")
        responses = [(k, list(r)) for k, r in enumerate(ex.response_ids) if len(r) > 0]
        if with_target:
            if ex.target_ids is None:
                raise ValueError(f"pack: with_target=True but example {b} has no target_ids "
                                 "(encode it with encode_example(..., with_target=True))")
            if len(ex.target_ids) > 0:
                responses.append((n_responses, list(ex.target_ids)))
        blocks.append((list(ex.prompt_ids), responses))
    sizes = [len(prompt) + sum(len(r) for _, r in responses) for prompt, responses in blocks]
    width = max(max(sizes), row_budget or 0)
    rows = first_fit_decreasing(sizes, width)

    total = len(rows) * width
    ids, positions = [pad_id] * total, [0] * total
    sources: list[int] = []
    targets: list[int] = []
    slots: list[int] = []
    lengths = [[0] * n_slots for _ in examples]
    attention_mask = torch.zeros((len(rows), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    start = [0] * len(blocks)  # flat (R*T) index of each block's first token
    for r, members in enumerate(rows):
        c = 0  # the row's next free column
        for b in members:
            prompt, responses = blocks[b]
            start[b] = at = r * width + c
            p = len(prompt)
            ids[at:at + p], positions[at:at + p] = prompt, range(p)
            attention_mask[r, c:c + p, c:c + p] = causal[:p, :p]
            prompt_last, at = at + p - 1, at + p
            for k, response in responses:
                m = len(response)
                ids[at:at + m], positions[at:at + m] = response, range(p, p + m)
                column = at - r * width
                attention_mask[r, column:column + m, c:c + p] = True  # a response sees its prompt
                attention_mask[r, column:column + m, column:column + m] = causal[:m, :m]  # and its own past
                sources.append(prompt_last)  # its first token is predicted from the prompt's last state
                sources.extend(range(at, at + m - 1))
                targets.extend(response)
                slots.extend([b * n_slots + k] * m)
                lengths[b][k] = m
                at += m
            c += sizes[b]
        attention_mask[r, c:, c:] = causal[:width - c, :width - c]  # padding sees earlier padding (and itself)
    shape = (len(rows), width)
    lengths_t = _long([m for row in lengths for m in row]).view(len(examples), n_slots)
    source_index = _long(sources)
    rewards = None
    if all(ex.scores is not None for ex in examples):
        rewards = torch.full((len(examples), n_slots), float("nan"))
        for b, ex in enumerate(examples):
            rewards[b, :len(ex.scores)] = torch.tensor(ex.scores, dtype=torch.float)
    return PackedBatch(_long(ids).view(shape),
                       _long(positions).view(shape), attention_mask[:, None],
                       source_index, _long(targets),
                       _long(slots), lengths_t, lengths_t > 0, rewards,
                       flat=_flat_layout(blocks, start, source_index, total, causal))


def _flat_layout(blocks: Sequence[tuple[list[int], list[tuple[int, list[int]]]]], start: Sequence[int],
                 source_index: Tensor, total: int, causal: Tensor) -> FlatLayout:
    """The padding-free layout of ``blocks`` (prompt, [(slot, response)]) placed at flat ``start`` in the
    padded (R*T) layout; ``causal`` is a lower-triangular bool matrix at least as wide as any response."""
    sizes = [len(prompt) + sum(len(r) for _, r in responses) for prompt, responses in blocks]
    prompt_lens = [len(prompt) for prompt, _ in blocks]
    offsets = [0] * len(blocks)  # each block's first token among the N real tokens
    for b in range(1, len(blocks)):
        offsets[b] = offsets[b - 1] + sizes[b - 1]
    n_tokens = offsets[-1] + sizes[-1]
    token_index = [i for b in range(len(blocks)) for i in range(start[b], start[b] + sizes[b])]
    token_of = torch.full((total,), -1, dtype=torch.long)
    token_of[_long(token_index)] = torch.arange(n_tokens)
    buckets, keys, queries, placed = [], [], [], []
    for members in length_buckets(sizes):
        width = max(sizes[b] for b in members)
        prompt = max(prompt_lens[b] for b in members)
        n_queries = max(sizes[b] - prompt_lens[b] for b in members)
        key_rows, query_rows, prompt_rows = [], [], []
        r = len(members)
        mask = torch.zeros((r, n_queries, width), dtype=torch.bool)
        for i, b in enumerate(members):
            p, s, first = prompt_lens[b], sizes[b], offsets[b]
            key_rows += [*range(first, first + s), *[n_tokens] * (width - s)]
            query_rows += [*range(first + p, first + s), *[n_tokens] * (n_queries - s + p)]
            prompt_rows += [*range(first, first + p), *[n_tokens] * (prompt - p)]
            mask[i, :s - p, :p] = True  # every response token sees the prompt
            at = 0  # the response's first row among the block's queries
            for _, response in blocks[b][1]:
                m = len(response)
                mask[i, at:at + m, p + at:p + at + m] = causal[:m, :m]  # and its own response's past
                at += m
            mask[i, s - p:, 0] = True  # padded query slots read the first key: no softmax row is empty
        buckets.append(AttentionBucket(r, width, prompt, n_queries, mask[:, None]))
        keys += key_rows
        queries += query_rows
        placed += prompt_rows + query_rows
    placed_t = _long(placed)
    order = torch.empty(n_tokens, dtype=torch.long)
    real = placed_t < n_tokens
    order[placed_t[real]] = real.nonzero().squeeze(1)
    # Padded slots read token 0: no query of the block attends them, and their own outputs are dropped.
    key_index, query_index = _long(keys), _long(queries)
    key_index[key_index == n_tokens] = 0
    query_index[query_index == n_tokens] = 0
    document = [b for b in range(len(blocks)) for _ in range(sizes[b])]
    segment = [k for prompt, responses in blocks
               for k, length in enumerate([len(prompt)] + [len(r) for _, r in responses]) for _ in range(length)]
    return FlatLayout(_long(token_index), token_of[source_index], key_index, query_index, buckets, order,
                      _long(document), _long(segment))


BUCKET_COST = 128 * 128
"""What one more attention call is worth, in (query, key) pairs: :func:`length_buckets` starts a new
bucket where padding the blocks to the bucket's longest would cost more than this."""


def length_buckets(sizes: Sequence[int], call_cost: int = BUCKET_COST) -> list[list[int]]:
    """Group block indices into buckets of consecutive lengths (longest first), minimising
    ``sum over buckets (blocks x longest^2) + call_cost x buckets``: the attention area when each block
    is one row padded to its bucket's longest, plus a price per call. Exact, by dynamic programming
    over the sorted lengths (O(B^2))."""
    order = sorted(range(len(sizes)), key=lambda b: (-sizes[b], b))
    best = [0] + [None] * len(order)  # best[j]: cost of bucketing the j longest
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # the last bucket holds order[i:j], padded to sizes[order[i]]
            cost = best[i] + (j - i) * sizes[order[i]] ** 2 + call_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def _long(values: Sequence[int]) -> Tensor:
    """A 1D long tensor of ``values`` through a C array: several times faster than ``torch.tensor(list)``."""
    if len(values) == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into bins of at most ``capacity`` (each size must fit one bin).

    Longest first, each into the first bin with room (ties in input order): at most 11/9 of the
    optimal number of bins plus one. Within a bin, indices are in the order they were placed.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        if sizes[i] > capacity:
            raise ValueError(f"first_fit_decreasing: item {i} of size {sizes[i]} exceeds the capacity {capacity}")
        for j, left in enumerate(room):
            if sizes[i] <= left:
                bins[j].append(i)
                room[j] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def block_mask(segment: Tensor, document: Tensor | None = None) -> Tensor:
    """(R, 1, T, T) bool, True where query t may attend key s: s <= t, both in the same document (example),
    and s in the prompt (segment 0) or in t's own segment (segment k+1 is response k).

    ``segment``, ``document``: (R, T) long, -1 at padding; ``document`` None means one example per row.
    Padding attends earlier padding only (itself at least), so no softmax row is empty.
    """
    pad = segment < 0
    if document is None:
        document = torch.zeros_like(segment)
    else:
        pad = pad | (document < 0)
    stride = int(segment.max()) + 2 if segment.numel() else 1
    prompt_code = torch.where(pad, -1, document * stride)
    code = torch.where(pad, -1, prompt_code + segment)  # one code per (document, segment)
    keys = code[:, None, :]
    allowed = (keys == code[:, :, None]) | (keys == prompt_code[:, :, None])
    t = segment.shape[1]
    allowed &= torch.ones(t, t, dtype=torch.bool, device=segment.device).tril()
    return allowed[:, None]


def response_states(model, batch: PackedBatch) -> Tensor:
    """The decoder's last hidden states ``(N, H)`` that predict each response token (one forward).

    Row i is the state at ``batch.source_index[i]``: the prompt's last state for a response's first
    token, then the state of the token before. PPO's value head reads these (the value of the state
    before each token is generated). The forward is padding-free when ``batch.flat`` is set and the
    model allows it (see the module docstring), else over the padded rows. Works for any Hugging Face
    causal LM (also PEFT-wrapped) whose attention takes a 4D mask and position ids (SDPA, eager;
    FlashAttention-2 models route 4D masks to SDPA, see
    :func:`alignexp.models.backbone.route_block_masks_to_sdpa`). A model whose layers turn out not to
    pass the padding-free layout on to their attention (Falcon's) is switched to the padded rows, with
    a warning (:func:`alignexp.models.attention.use_padded_layout`).
    """
    decoder = model.get_decoder()
    if batch.flat is not None and padding_free_supported(decoder):
        flat = batch.flat
        input_ids = batch.input_ids.view(-1).index_select(0, flat.token_index)[None]
        position_ids = batch.position_ids.view(-1).index_select(0, flat.token_index)[None]
        try:
            hidden = flat_forward(decoder, input_ids, position_ids, flat)
            return hidden[0].index_select(0, flat.source)
        except LayoutNotReached as error:
            use_padded_layout(getattr(decoder, "_module", decoder), str(error))
    flex = decoder.config._attn_implementation == "flex_attention"
    with attention_implementation_as(decoder, "sdpa") if flex else contextlib.nullcontext():
        hidden = decoder(input_ids=batch.input_ids, attention_mask=padded_masks(decoder, batch, model.dtype),
                         position_ids=batch.position_ids, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source_index)


def padded_masks(decoder, batch: PackedBatch, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The attention mask(s) of ``batch``'s padded rows for ``decoder``: the block rule, with the model's own
    sliding-window rule over position ids (they restart per response): one mask, or one per kind of layer
    (``{"full_attention": ..., "sliding_attention": ...}``) for a model that mixes them
    (:func:`alignexp.models.attention.layer_windows`; such models take the mapping as given).

    Bool (True = may attend) for SDPA, which takes a bool mask beside a query of any dtype (under
    FSDP2's mixed precision ``model.dtype`` is fp32 while the query is bf16; a
    ``flex_attention`` model runs the padded rows through SDPA (FlexAttention takes no dense mask);
    additive in ``dtype`` for other implementations (eager adds the mask to its scores)."""
    allowed, config = batch.attention_mask, decoder.config

    def windowed(window: int | None) -> Tensor:
        mask = allowed
        if window is not None:
            gap = batch.position_ids[:, None, :, None] - batch.position_ids[:, None, None, :]
            mask = mask & (gap < window)
        return mask if _takes_bool_masks(config) else additive_mask(mask, dtype)

    kinds = layer_windows(config)
    if kinds is None:
        return windowed(sliding_window(config))
    return {kind: windowed(window) for kind, window in kinds.items()}


def _takes_bool_masks(config) -> bool:
    """Whether the model's attention is SDPA (or FlashAttention-2, whose 4D masks run through SDPA)."""
    if config._attn_implementation == "sdpa":
        return True
    from transformers.modeling_utils import AttentionInterface

    current = AttentionInterface._global_mapping.get(config._attn_implementation)
    return getattr(current, "routes_block_masks_to_sdpa", False)


def token_logps(model, batch: PackedBatch, states: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Per-token response log-probs ``(N,)`` in fp32, aligned with ``batch.target_ids`` and ``batch.slot``.

    ``temperature`` T: log-probs of pi_T(y_t) = softmax(logits / T)[y_t], the distribution the sampling
    engine draws from at T (PPO's rollouts); T = 1 is the model's own. ``states``: :func:`response_states`
    of this model and batch when the caller already has them (then no second forward runs).
    :func:`sequence_logps` is their sum per response.
    """
    if states is None:
        states = response_states(model, batch)
    return chunked_token_logps(model.get_output_embeddings(), states, batch.target_ids,
                               softcap=logit_softcap(model), temperature=temperature)


def logit_softcap(model) -> float | None:
    """The model's final logit soft-capping c (Gemma-2, Gemma-3: logits = c * tanh(logits / c)), or None."""
    config = getattr(model, "config", None)
    if config is None:
        config = model.get_decoder().config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def softcapped(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` (``logits`` unchanged when ``cap`` is None)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


LOGIT_CHUNK = 2**22
"""Most logits (tokens x vocabulary) the head computes at once: 16 MiB in fp32, 131 tokens at a 32k vocabulary."""


def _head_logps(head, states: Tensor, targets: Tensor, softcap: float | None = None,
                temperature: float = 1.0) -> Tensor:
    """log softmax(head(states) / T)[i, targets[i]] in fp32: the target's logit minus the log-sum-exp (of the
    soft-capped logits where the model caps them, divided by the temperature T after the capping, as the
    sampling engine divides the model's output)."""
    logits = softcapped(head(states).float(), softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(head, states: Tensor, targets: Tensor, chunk: int | None = None,
                        softcap: float | None = None, temperature: float = 1.0) -> Tensor:
    """``log softmax(head(states) / T)`` at ``targets`` ``(N,)``, ``chunk // vocabulary`` tokens at a time
    (``chunk``: :data:`LOGIT_CHUNK` when None); ``softcap``: the model's final logit soft-capping
    (:func:`logit_softcap`), applied to each chunk's logits; ``temperature`` T (1: the model's own).

    With gradients, each chunk is checkpointed: its logits are freed after the forward and recomputed
    in the backward, one chunk at a time, so neither pass holds the (N, V) logits, their log-softmax or
    their gradient; the price is the head's matrix product run once more in the backward (about 2% of
    a 7B step). Works with any head module (LoRA on it included).
    """
    vocab = getattr(head, "out_features", None) or getattr(head.weight, "ds_shape", head.weight.shape)[0]
    rows = max(1, (LOGIT_CHUNK if chunk is None else chunk) // vocab)
    if states.shape[0] <= rows:
        return _head_logps(head, states, targets, softcap, temperature)
    track = torch.is_grad_enabled() and (states.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for start in range(0, states.shape[0], rows):
        args = (head, states[start:start + rows], targets[start:start + rows], softcap, temperature)
        pieces.append(checkpoint(_head_logps, *args, use_reentrant=False) if track else _head_logps(*args))
    return torch.cat(pieces)


def sequence_logps(model, batch: PackedBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Summed response log-probs ``(B, n)`` of a packed batch, with ``lengths`` and ``mask``.

    ``logps[b, k] = sum_t log pi(y_t | x, y_<t)`` over response k of example b (the sequence
    log-likelihood of DPO, Rafailov et al. 2023, Eq. 7). One forward per batch (padding-free, or over
    the padded rows; see :func:`response_states`). Masked slots hold 0.
    """
    return per_response(token_logps(model, batch), batch), batch.lengths, batch.mask


def per_response(per_token: Tensor, batch: PackedBatch) -> Tensor:
    """Per-token values ``(N,)`` of a packed batch summed per response: ``(B, n)``, 0 in masked slots."""
    b, n = batch.lengths.shape
    summed = torch.zeros(b * n, dtype=per_token.dtype, device=per_token.device)
    return summed.index_add(0, batch.slot, per_token).view(b, n)
