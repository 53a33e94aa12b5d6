"""The generation engine: token ids in, token ids (and their log-probs) out.

Batched sampling with a KV cache, temperature, top-k, top-p, a cap on new tokens and a stop at
EOS, all on the model's device: one draw per step for the whole batch, no copy to the host until the
batch is done. Every prompt has its own random stream (``seeds[i]``): a counter-based hash of
(seed, step) gives one uniform number per row and step, and the token is drawn by inverting the
row's cumulative distribution (:func:`sample_next`). A prompt's sample so does not depend on which
other prompts share its batch, and interrupted and resumed sampling reproduces itself. Greedy
decoding at temperature 0. The engine knows tokens, not configs or text.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ENGINE_VERSION = 2
"""Changes whenever the same seeds and weights give different samples; part of every sampling cache key.
1: one ``torch.Generator`` per row and ``torch.multinomial`` on the host. 2: counter-based uniforms on
the device and inverse-CDF draws (:func:`stream_uniforms`, :func:`sample_next`)."""

TOP_P_PREFIX = 256
"""Top-p without top-k looks for the nucleus among this many most likely tokens first, and sorts the
whole vocabulary only when their mass falls short of ``top_p`` (on the CPU; see :func:`sample_next`)."""


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


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(getattr(model, "get_base_model", lambda: model)().forward).parameters)


def _cache_argument(model) -> str:
    """The KV-cache argument's name: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p as a dense mask over the vocabulary (-inf where dropped): the definition that
    :func:`sample_next` computes on a sorted prefix instead."""
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


# -- random streams --------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """The low 32 bits of ``x * c`` for ``x`` in [0, 2^32) held in int64, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with full avalanche (C. Wellons' "lowbias32"), on int64 tensors in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seeds: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """(B,) int64 keys in [0, 2^32), one per seed (any Python int, taken modulo 2^64)."""
    lo = torch.tensor([int(s) & _MASK32 for s in seeds], dtype=torch.long)
    hi = torch.tensor([(int(s) >> 32) & _MASK32 for s in seeds], dtype=torch.long)
    return _mix32(_mix32(lo ^ 0x9E3779B9) ^ hi).to(device)


def stream_uniforms(keys: Tensor, steps: int | Sequence[int]) -> Tensor:
    """Draws ``steps`` of each key's stream, float32 in (0, 1): (B,) for one step, (B, S) for S steps.

    Draw t of key k is ``((h >> 8) + 1/2) / 2^24`` with ``h = mix(k ^ mix(t))``: counter-based, a function
    of (key, step) alone, computed on the keys' device."""
    counters = torch.as_tensor(steps, dtype=torch.long, device=keys.device)
    h = _mix32(keys.view(-1, *[1] * counters.dim()) ^ _mix32(counters + 0x632BE5AB))
    return ((h >> 8).float() + 0.5) * 2.0**-24


# -- one step's draw -------------------------------------------------------------------------------------
INVERSION_BLOCK = 128
"""Inverse-CDF draws over a whole vocabulary run in two levels: blocks of this many tokens, then the
tokens of the chosen block (:func:`_invert_blocks`)."""


def _below(x: Tensor, total: Tensor) -> Tensor:
    """``x`` capped just below ``total``, so that rounding never lands a draw past the last token with mass."""
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))


def _invert(cdf: Tensor, x: Tensor) -> Tensor:
    """(B,) column of each row's unnormalised, non-decreasing ``cdf`` (B, V) where ``x`` (B, 1) falls: column
    j when cdf[j-1] <= x < cdf[j]; with ``x`` drawn uniformly below the total, j has probability
    (cdf[j] - cdf[j-1]) / total, and a column of zero mass is never chosen."""
    return torch.searchsorted(cdf, _below(x, cdf[:, -1:]), right=True)[:, 0]


def _invert_blocks(weights: Tensor, uniforms: Tensor) -> Tensor:
    """(B,) index drawn from each row of ``weights`` (B, V) >= 0 with probability weight / total.

    Two levels, so that no cumulative sum runs over the whole vocabulary: the block (of
    :data:`INVERSION_BLOCK` tokens) is drawn from the blocks' total weights, then the token from the
    chosen block's weights, with what is left of the draw.
    """
    rows, vocab = weights.shape
    if vocab <= 2 * INVERSION_BLOCK:  # a small vocabulary: one level
        cdf = weights.cumsum(-1)
        return _invert(cdf, uniforms[:, None] * cdf[:, -1:])
    size = INVERSION_BLOCK
    blocks = -(-vocab // size)
    if blocks * size != vocab:
        weights = torch.nn.functional.pad(weights, (0, blocks * size - vocab))
    weights = weights.view(rows, blocks, size)
    block_cdf = weights.sum(-1).cumsum(-1)
    x = uniforms[:, None] * block_cdf[:, -1:]
    block = _invert(block_cdf, x)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    within = weights[torch.arange(rows, device=weights.device), block].cumsum(-1)
    return block * size + _invert(within, (x[:, 0] - before)[:, None].clamp(min=0))


def _draw_nucleus(kept: Tensor, index: Tensor, uniforms: Tensor, top_p: float, mass: Tensor | float = 1.0) -> Tensor:
    """(B,) token drawn from the probabilities ``kept`` (B, K) of tokens ``index``, sorted most likely first,
    cut to the nucleus: a token stays while the mass before it is below ``top_p * mass``."""
    if top_p < 1:
        kept = kept.masked_fill(kept.cumsum(-1) - kept >= top_p * mass, 0.0)
    cdf = kept.cumsum(-1)
    return index.gather(1, _invert(cdf, uniforms[:, None] * cdf[:, -1:])[:, None])[:, 0]


NUCLEUS_BISECTIONS = 14
"""Halvings (in log space) of the probability interval that holds the top-p cut in :func:`long_nucleus`: from
at most log(2V / (1 - p)) nats (13.4 at V = 32k, p = 0.9) to a thousandth of a nat or less."""


def long_nucleus(probs: Tensor, top_p: float, spare: Tensor | None = None) -> Tensor:
    """(B, V): each row of ``probs`` (B, V) kept in its top-p nucleus and 0 elsewhere, found without sorting
    the vocabulary (the result may be ``spare``, a reused buffer).

    A token is in the nucleus when the mass of the tokens more likely than it is below p. With
    ``above(t)`` the mass of the probabilities > t, bisection keeps ``above(hi) < p <= above(lo)``: every
    token above ``hi`` is in, every token at or below ``lo`` out, and the few in between (at most
    :data:`TOP_P_PREFIX`, else the row is sorted) are sorted and kept while the mass before them is below p.
    """
    kept = torch.empty_like(probs) if spare is None else spare
    mask = torch.empty_like(probs, dtype=torch.bool)
    # above(lo) >= 1 - V * lo > p and above(max) = 0 < p; halve the interval in log space
    lo = torch.full_like(probs[:, :1], (1 - top_p) / (2 * probs.shape[-1]))
    hi = probs.amax(-1, keepdim=True)
    for _ in range(NUCLEUS_BISECTIONS):
        mid = (lo * hi).sqrt()
        above = (probs * torch.gt(probs, mid, out=mask)).sum(-1, keepdim=True)
        lo, hi = torch.where(above >= top_p, mid, lo), torch.where(above >= top_p, hi, mid)
    torch.mul(probs, torch.gt(probs, hi, out=mask), out=kept)  # the tokens surely in
    between = torch.where((probs > lo) & (probs <= hi), probs, 0.0)
    values, index = between.topk(min(TOP_P_PREFIX, probs.shape[-1]), dim=-1)
    values = values.masked_fill(kept.sum(-1, keepdim=True) + values.cumsum(-1) - values >= top_p, 0.0)
    kept.scatter_add_(1, index, values)  # the tokens between, in while the mass before them is below p
    crowded = ((between > 0).sum(-1) > values.shape[-1]).nonzero()[:, 0]  # more ties than the sorted slice
    if len(crowded):
        ordered, order = probs[crowded].sort(dim=-1, descending=True)
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered >= top_p, 0.0)
        kept[crowded] = torch.zeros_like(ordered).scatter_(1, order, ordered)
    return kept


def _logps_of(logits: Tensor, ids: Tensor, out: Tensor) -> Tensor:
    """log softmax(logits)[row, ids[row]], the log-softmax written into ``out`` (a reused buffer)."""
    return torch.log_softmax(logits, dim=-1, out=out).gather(1, ids[:, None])[:, 0]


def sample_next(logits: Tensor, params: SamplingParams, uniforms: Tensor | None,
                workspace: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The next token of each row and its log-prob under the unmodified distribution (temperature 1).

    ``logits`` (B, V); ``uniforms`` (B,) in (0, 1) (:func:`stream_uniforms`; unused when greedy);
    ``workspace``: two float32 (B, V) buffers reused from step to step (fresh full-vocabulary
    temporaries cost page faults on the CPU: several ms per step at 64 x 32k).

    Sampling from softmax(logits / T) truncated by top-k, then top-p (the smallest set of the most
    likely tokens whose mass reaches p, as :func:`_filter_logits` defines them), is inverse-CDF
    sampling: the token where ``u`` times the kept mass falls in the kept tokens' cumulative mass.
    Without truncation: one softmax and a two-level search (:func:`_invert_blocks`); at T = 1 the same
    softmax gives the reported log-prob. With top-k, only the k most likely are sorted (``topk``); top-p
    alone first looks among the :data:`TOP_P_PREFIX` most likely, and where their mass is short of p
    finds the cut by bisection (:func:`long_nucleus`), on the CPU; elsewhere the vocabulary is
    sorted at once (sorting is fast there, and checking the prefix would wait for the device).
    """
    logits = logits.float()
    probs, spare = workspace if workspace is not None else (torch.empty_like(logits), torch.empty_like(logits))
    if params.temperature == 0:
        ids = logits.argmax(-1)
        return ids, _logps_of(logits, ids, spare)
    if uniforms is None:
        raise ValueError("sample_next: sampling at temperature > 0 needs one uniform number per row")
    t1 = params.temperature == 1
    torch.softmax(logits if t1 else torch.mul(logits, 1 / params.temperature, out=spare), dim=-1, out=probs)
    vocab = logits.shape[-1]
    top_k = params.top_k if params.top_k < vocab else 0
    if top_k == 0 and params.top_p >= 1:
        ids = _invert_blocks(probs, uniforms)
        return ids, probs.gather(1, ids[:, None])[:, 0].log() if t1 else _logps_of(logits, ids, spare)
    if top_k:
        kept, index = probs.topk(top_k, dim=-1)
        ids = _draw_nucleus(kept, index, uniforms, params.top_p, kept.sum(-1, keepdim=True))
    elif probs.device.type == "cpu" and TOP_P_PREFIX < vocab:
        kept, index = probs.topk(TOP_P_PREFIX, dim=-1)
        ids = _draw_nucleus(kept, index, uniforms, params.top_p)
        short = (kept.sum(-1) < params.top_p).nonzero()[:, 0]  # rows whose nucleus is longer than the prefix
        if len(short) == len(ids):
            ids = _invert_blocks(long_nucleus(probs, params.top_p, spare), uniforms)
        elif len(short):
            ids[short] = _invert_blocks(long_nucleus(probs[short], params.top_p), uniforms[short])
    else:
        kept, index = probs.sort(dim=-1, descending=True)
        ids = _draw_nucleus(kept, index, uniforms, params.top_p)
    return ids, _logps_of(logits, ids, spare)


# -- the decode loop -------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
             seeds: Sequence[int] | None = None, batch_size: int = 64) -> list[Generation]:
    """Sample one continuation per prompt (repeat a prompt to get several).

    Prompts are batched by length (the samples do not depend on the batching), ``batch_size`` at a time.
    """
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty (a continuation is predicted from its last token)")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    out: list[Generation | None] = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            rows = sorted(order[start:start + batch_size])  # in input order within a batch
            generations = _generate_batch(model, [prompts[i] for i in rows], params, eos_id, pad_id,
                                          [seeds[i] for i in rows])
            for i, g in zip(rows, generations):
                out[i] = g
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _generate_batch(model, prompts, params: SamplingParams, eos_id: int, pad_id: int, seeds) -> list[Generation]:
    device = next(model.parameters()).device
    batch, width, new = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.ones((batch, width + new), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, so every row's next token is at the end
        input_ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        attention[i, :width - len(p)] = 0
    input_ids, attention = input_ids.to(device), attention.to(device)
    uniforms = stream_uniforms(stream_keys(seeds, device), range(new)) if params.temperature > 0 else None
    positions = (attention[:, :width].cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1:] + 1
    tokens = torch.full((batch, new), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, new), device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    accepted = _forward_parameters(model)
    cache_key = "cache" if "cache" in accepted else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}  # the head on the last position only
    check_every = 1 if device.type == "cpu" else 8  # elsewhere, "all finished?" waits for the device
    workspace = None
    past, step_ids = None, input_ids
    for step in range(new):
        output = model(input_ids=step_ids, attention_mask=attention[:, :width + step], position_ids=positions,
                       use_cache=True, **{cache_key: past}, **extra)
        past = getattr(output, cache_key)
        logits = output.logits[:, -1, :].float()
        if workspace is None:
            workspace = (torch.empty_like(logits), torch.empty_like(logits))
        next_ids, next_logps = sample_next(logits, params, None if uniforms is None else uniforms[:, step], workspace)
        next_ids = next_ids.masked_fill(finished, pad_id)  # a finished row pads (its tokens end at its EOS)
        tokens[:, step] = next_ids
        logprobs[:, step] = next_logps
        finished |= next_ids == eos_id
        if (step + 1) % check_every == 0 and bool(finished.all()):
            break
        step_ids, positions = next_ids[:, None], next_position + step
    eos = tokens == eos_id
    lengths = torch.where(finished, eos.int().argmax(-1) + 1, new).tolist()  # up to the first EOS
    tokens, logprobs, finished = tokens.cpu(), logprobs.cpu(), finished.tolist()
    return [Generation(tokens[i, :lengths[i]].tolist(), logprobs[i, :lengths[i]].tolist(), finished[i])
            for i in range(batch)]
