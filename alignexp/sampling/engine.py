"""The generation engine: token ids in, token ids (and their log-probs) out.

Batched sampling with a KV cache, temperature, top-k, top-p, a cap on new tokens and a stop at
EOS. Every prompt has its own random stream (``seeds[i]``), so a prompt's sample does not depend
on which other prompts share its batch: interrupted and resumed sampling reproduces itself.
Greedy decoding at temperature 0. The engine knows tokens, not configs or text.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_new_tokens >= 1")


@dataclass
class Generation:
    """``token_ids``: the new tokens (EOS included when it was reached); ``logprobs``: their
    log-probabilities under the model's unmodified distribution (temperature 1, no truncation)."""

    token_ids: list[int]
    logprobs: list[float]
    finished: bool


def _cache_argument(model) -> str:
    """The KV-cache argument's name: ``cache`` in newer transformers, ``past_key_values`` before."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
             seeds: Sequence[int] | None = None, batch_size: int = 64) -> list[Generation]:
    """Sample one continuation per prompt (repeat a prompt to get several)."""
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError("one seed per prompt")
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    try:
        for start in range(0, len(prompts), batch_size):
            out.extend(_generate_batch(model, prompts[start:start + batch_size], params, eos_id, pad_id,
                                       seeds[start:start + batch_size]))
    finally:
        model.train(was_training)
    return out


def _generate_batch(model, prompts, params: SamplingParams, eos_id: int, pad_id: int, seeds) -> list[Generation]:
    device = next(model.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding, so every row's next token is at the end
        input_ids[i, width - len(p):] = torch.tensor(list(p), device=device)
        attention[i, width - len(p):] = 1
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    tokens = torch.full((batch, params.max_new_tokens), pad_id, dtype=torch.long)
    logprobs = torch.zeros((batch, params.max_new_tokens))
    lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    cache_key = _cache_argument(model)
    past = None
    step_ids = input_ids
    for step in range(params.max_new_tokens):
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        output = model(input_ids=step_ids, attention_mask=attention, position_ids=position_ids,
                       use_cache=True, **{cache_key: past})
        past = getattr(output, cache_key)
        logits = output.logits[:, -1, :].float().cpu()
        model_logprobs = torch.log_softmax(logits, dim=-1)
        if params.temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            probs = torch.softmax(_filter_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)
            next_ids = torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0]
                                    for i in range(batch)])
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        tokens[:, step] = next_ids
        logprobs[:, step] = model_logprobs.gather(1, next_ids[:, None]).squeeze(1)
        just_done = ~finished & (next_ids == eos_id)
        lengths[just_done] = step + 1
        finished |= just_done
        if bool(finished.all()):
            break
        step_ids = next_ids[:, None].to(device)
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=1)
    return [Generation(tokens[i, :lengths[i]].tolist(), logprobs[i, :lengths[i]].tolist(), bool(finished[i]))
            for i in range(batch)]
