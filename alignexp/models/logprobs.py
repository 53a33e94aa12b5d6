"""The one place that computes sequence log-probabilities (contract in ../DESIGN.md).

**Shared-prefix packing.** An example (a prompt and its n responses) is laid out as one block
``[prompt | response_1 | ... | response_n]`` under a block attention mask in which every response
sees the prompt and its own earlier tokens, never another response. Position ids restart after the
prompt for each response, so each response is computed exactly as if it followed the prompt alone,
while the prompt's tokens are computed once for all n responses. The first token of every response
is predicted from the prompt's last hidden state.

**Rows.** The blocks of a batch are packed into R <= B rows of T tokens, first-fit decreasing, T
being the longest block (or ``row_budget``): short examples share a row instead of each being padded
to the longest one, and blocks in one row never see each other (the mask is block-diagonal). Rows are
no wider than the longest block because the attention kernels that take a mask (SDPA's, eager)
compute every (query, key) pair of a row: one padding-free row of all N tokens would cost N^2 in
attention instead of R*T^2. The padding that is left is what first-fit cannot fill (for the DPO
shape of ``python -m alignexp.bench``, about a fifth of the positions). One forward per batch.

**Head.** Only the hidden states that predict response tokens go through the output head (a gather,
then the head on N response tokens instead of R*T positions), and the log-softmax runs in fp32.

**Mask.** The boolean mask is turned into an additive one (0 / dtype min) once per forward, so that
SDPA does not convert it again in every layer and every layer's backward shares the one copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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
    reference log-probs when the collator has them.

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

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.lengths.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def encode_text(tokenizer, text: Text, *, is_prompt: bool) -> list[int]:
    """Token ids of a prompt (BOS first, chat template for messages) or a response (EOS last)."""
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
    # The mask is written block by block (a few slice writes per example, no T x T comparisons).
    attention_mask = torch.zeros((len(rows), width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, members in enumerate(rows):
        offset, row_mask, c = r * width, attention_mask[r], 0  # c: the row's next free column
        for b in members:
            prompt, responses = blocks[b]
            p, first = len(prompt), c
            ids[offset + c:offset + c + p], positions[offset + c:offset + c + p] = prompt, range(p)
            row_mask[c:c + p, c:c + p] = causal[:p, :p]
            prompt_last, c = offset + c + p - 1, c + p
            for k, response in responses:
                m = len(response)
                ids[offset + c:offset + c + m], positions[offset + c:offset + c + m] = response, range(p, p + m)
                row_mask[c:c + m, first:first + p] = True  # a response sees its prompt
                row_mask[c:c + m, c:c + m] = causal[:m, :m]  # and its own earlier tokens
                sources.append(prompt_last)  # its first token is predicted from the prompt's last state
                sources.extend(range(offset + c, offset + c + m - 1))
                targets.extend(response)
                slots.extend([b * n_slots + k] * m)
                lengths[b][k] = m
                c += m
        row_mask[c:, c:] = causal[:width - c, :width - c]  # padding sees earlier padding (and itself)
    shape = (len(rows), width)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    rewards = None
    if all(ex.scores is not None for ex in examples):
        rewards = torch.full((len(examples), n_slots), float("nan"))
        for b, ex in enumerate(examples):
            rewards[b, :len(ex.scores)] = torch.tensor(ex.scores, dtype=torch.float)
    return PackedBatch(torch.tensor(ids, dtype=torch.long).view(shape),
                       torch.tensor(positions, dtype=torch.long).view(shape), attention_mask[:, None],
                       torch.tensor(sources, dtype=torch.long), torch.tensor(targets, dtype=torch.long),
                       torch.tensor(slots, dtype=torch.long), lengths_t, lengths_t > 0, rewards)


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


def additive_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The bool mask (True = may attend) as an additive one: 0 where allowed, ``dtype``'s minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def response_states(model, batch: PackedBatch) -> Tensor:
    """The decoder's last hidden states ``(N, H)`` that predict each response token (one forward).

    Row i is the state at ``batch.source_index[i]``: the prompt's last state for a response's first
    token, then the state of the token before. PPO's value head reads these (the value of the state
    before each token is generated). Works for any Hugging Face causal LM (also PEFT-wrapped) whose
    attention takes a 4D additive mask and position ids (SDPA, eager; FlashAttention-2 models route
    4D masks to SDPA, see :func:`alignexp.models.backbone.route_block_masks_to_sdpa`).
    """
    decoder = model.get_decoder()
    mask = additive_mask(batch.attention_mask, model.dtype)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                     use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.source_index)


def token_logps(model, batch: PackedBatch, states: Tensor | None = None) -> Tensor:
    """Per-token response log-probs ``(N,)`` in fp32, aligned with ``batch.target_ids`` and ``batch.slot``.

    ``states``: :func:`response_states` of this model and batch when the caller already has them
    (then no second forward runs). :func:`sequence_logps` is their sum per response.
    """
    if states is None:
        states = response_states(model, batch)
    logits = model.get_output_embeddings()(states).float()
    return torch.log_softmax(logits, dim=-1).gather(1, batch.target_ids[:, None]).squeeze(1)


def sequence_logps(model, batch: PackedBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Summed response log-probs ``(B, n)`` of a packed batch, with ``lengths`` and ``mask``.

    ``logps[b, k] = sum_t log pi(y_t | x, y_<t)`` over response k of example b (the sequence
    log-likelihood of DPO, Rafailov et al. 2023, Eq. 7). One forward over the packed rows. Masked
    slots hold 0.
    """
    per_token = token_logps(model, batch)
    b, n = batch.lengths.shape
    summed = torch.zeros(b * n, dtype=per_token.dtype, device=per_token.device)
    summed = summed.index_add(0, batch.slot, per_token).view(b, n)
    return summed, batch.lengths, batch.mask
