"""Text in, text out: the adapter between tasks/judges (text) and the engine (token ids)."""

from __future__ import annotations

from collections.abc import Sequence

from alignexp.models.logprobs import encode_text
from alignexp.sampling.engine import Generation, SamplingParams, generate
from alignexp.tasks.base import Text


def sample_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """The random stream of one (prompt, sample): independent of batching and of other prompts."""
    return (base_seed * 1_000_003 + prompt_index) * 1_009 + sample_index


def sample_responses(model, tokenizer, prompts: Sequence[Text], n: int, params: SamplingParams, *,
                     seed: int = 0, max_prompt_len: int = 512, batch_size: int = 64,
                     first_index: int = 0, backend=None) -> list[list[Generation]]:
    """n generations for each prompt; prompt i uses the streams ``sample_seed(seed, first_index + i, k)``.

    ``backend``: None for the HF engine on ``model``; or a backend of :mod:`alignexp.sampling.vllm_backend`
    (anything with ``generate(prompt_ids, params, eos_id=..., seeds=...)``), which then samples instead.
    """
    prompt_ids = [encode_text(tokenizer, p, is_prompt=True)[-max_prompt_len:] for p in prompts]
    flat_ids = [ids for ids in prompt_ids for _ in range(n)]
    seeds = [sample_seed(seed, first_index + i, k) for i in range(len(prompts)) for k in range(n)]
    if backend is not None:
        flat = backend.generate(flat_ids, params, eos_id=tokenizer.eos_token_id, seeds=seeds)
    else:
        flat = generate(model, flat_ids, params, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                        seeds=seeds, batch_size=batch_size)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def generated_tokens(rows: Sequence[Sequence[Generation]]) -> int:
    """The tokens sampled in ``rows`` (one list of generations per prompt): a progress bar's tokens per second."""
    return sum(len(g.token_ids) for row in rows for g in row)


def decode(tokenizer, generation: Generation) -> str:
    """The generated text without EOS or other special tokens."""
    return tokenizer.decode(generation.token_ids, skip_special_tokens=True)


def sample_texts(model, tokenizer, prompts: Sequence[Text], n: int, params: SamplingParams, *,
                 seed: int = 0, max_prompt_len: int = 512, batch_size: int = 64, first_index: int = 0,
                 backend=None) -> list[list[str]]:
    """Like :func:`sample_responses`, decoded to text."""
    generations = sample_responses(model, tokenizer, prompts, n, params, seed=seed, max_prompt_len=max_prompt_len,
                                   batch_size=batch_size, first_index=first_index, backend=backend)
    return [[decode(tokenizer, g) for g in row] for row in generations]
