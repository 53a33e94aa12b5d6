"""The one place that computes sequence log-probabilities (contract in ../DESIGN.md).

A batch of B prompts with up to n responses each is laid out with **shared-prefix packing**:
one row per prompt, ``[prompt | response_1 | ... | response_n]``, and a block attention mask in
which every response sees the prompt and its own earlier tokens, never another response.
Position ids restart after the prompt for each response, so each response is computed exactly as
if it followed the prompt alone, while the prompt's tokens are computed once for all n responses.
The first token of every response is predicted from the prompt's last hidden state.

Only the hidden states that predict response tokens go through the output head (a gather, then
the head on N response tokens instead of B*T positions), and the log-softmax runs in fp32.
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

    Shapes: ``input_ids``, ``position_ids``: (B, T); ``attention_mask``: (B, 1, T, T) bool
    (True = may attend); ``source_index``: (N,) flat index into (B*T) of the state that predicts
    each response token; ``target_ids``: (N,); ``slot``: (N,) flat index into (B*n) of the
    response each token belongs to; ``lengths``: (B, n) response tokens; ``mask``: (B, n) bool;
    ``rewards``: (B, n) scores (NaN where absent) when every example has scores; ``ref_logps``:
    (B, n) precomputed reference log-probs when the collator has them.
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
         with_target: bool = False) -> PackedBatch:
    """Lay out B encoded examples as shared-prefix rows (see the module docstring).

    ``n`` is the number of response slots (default: the longest list); shorter lists are masked.
    With ``with_target``, the example's target response is appended as one more slot (column n).
    """
    rows = [(ex.prompt_ids, ex.response_ids + ([ex.target_ids] if with_target else [])) for ex in examples]
    n_slots = (n or max(len(ex.response_ids) for ex in examples)) + int(with_target)
    lengths_rows = [len(p) + sum(len(r) for r in rs) for p, rs in rows]
    batch, width = len(rows), max(lengths_rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), -1, dtype=torch.long)  # -1 pad, 0 prompt, k+1 response k
    lengths = torch.zeros((batch, n_slots), dtype=torch.long)
    mask = torch.zeros((batch, n_slots), dtype=torch.bool)
    sources: list[int] = []
    targets: list[int] = []
    slots: list[int] = []
    for b, (prompt, responses) in enumerate(rows):
        if with_target and len(responses) - 1 < n_slots - 1:  # keep the target in the last column
            responses = responses[:-1] + [[]] * (n_slots - len(responses)) + responses[-1:]
        p = len(prompt)
        input_ids[b, :p] = torch.tensor(prompt)
        position_ids[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        start = p
        for k, response in enumerate(responses):
            length = len(response)
            if length == 0:
                continue
            input_ids[b, start:start + length] = torch.tensor(response)
            position_ids[b, start:start + length] = torch.arange(p, p + length)
            segment[b, start:start + length] = k + 1
            row_offset = b * width
            sources.append(row_offset + p - 1)  # first token predicted from the prompt's last state
            sources.extend(range(row_offset + start, row_offset + start + length - 1))
            targets.extend(response)
            slots.extend([b * n_slots + k] * length)
            lengths[b, k], mask[b, k] = length, True
            start += length
    attention_mask = block_mask(segment)
    scores = [ex.scores for ex in examples]
    rewards = None
    if all(s is not None for s in scores):
        rewards = torch.full((batch, n_slots), float("nan"))
        for b, s in enumerate(scores):
            rewards[b, :len(s)] = torch.tensor(s, dtype=torch.float)
    return PackedBatch(input_ids, position_ids, attention_mask, torch.tensor(sources, dtype=torch.long),
                       torch.tensor(targets, dtype=torch.long), torch.tensor(slots, dtype=torch.long),
                       lengths, mask, rewards)


def block_mask(segment: Tensor) -> Tensor:
    """(B, 1, T, T) bool: causal, and a response token sees the prompt (segment 0) and its own segment.

    Pad positions (segment -1) attend only themselves, so no softmax row is empty.
    """
    t = segment.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool)
    return allowed[:, None]


def response_states(model, batch: PackedBatch) -> Tensor:
    """The decoder's last hidden states ``(N, H)`` that predict each response token (one forward).

    Row i is the state at ``batch.source_index[i]``: the prompt's last state for a response's first
    token, then the state of the token before. PPO's value head reads these (the value of the state
    before each token is generated).
    """
    decoder = model.get_decoder()
    attention_mask = batch.attention_mask
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to scores
        attention_mask = torch.zeros(attention_mask.shape, dtype=model.dtype, device=attention_mask.device) \
            .masked_fill(~attention_mask, torch.finfo(model.dtype).min)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state
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

    One forward over the packed rows. Masked slots hold 0. Works for any Hugging Face causal LM
    (also PEFT-wrapped) whose decoder accepts a 4D boolean attention mask and position ids.
    """
    per_token = token_logps(model, batch)
    b, n = batch.lengths.shape
    summed = torch.zeros(b * n, dtype=per_token.dtype, device=per_token.device)
    summed = summed.index_add(0, batch.slot, per_token).view(b, n)
    return summed, batch.lengths, batch.mask
