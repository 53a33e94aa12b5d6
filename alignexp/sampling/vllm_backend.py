"""An optional vLLM backend for the generation engine (used only where ``vllm`` imports and CUDA is present).

It takes and returns what :func:`alignexp.sampling.engine.generate` does (token ids in, a
:class:`Generation` per prompt out, one seed per prompt), so callers switch backends without other
changes; the HF engine stays the fallback and the reference implementation. vLLM loads the model
from its folder (an HF-format run output), not from a module in memory. Untested in CI (no GPU
there); per-token log-probs are vLLM's, of the unmodified distribution with vLLM's default
``logprobs_mode`` (``raw_logprobs``, vLLM >= 0.10), which is what the HF engine reports too.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alignexp.sampling.engine import Generation, SamplingParams


def vllm_available() -> bool:
    """True where ``vllm`` is installed and a CUDA device is visible."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


class VLLMEngine:
    """``generate(prompts, params, eos_id=..., seeds=...)`` with vLLM, for the model in ``model_path``."""

    def __init__(self, model_path: str | Path, dtype: str = "auto", gpu_memory_utilization: float = 0.85):
        from vllm import LLM

        self.llm = LLM(model=str(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                 seeds: Sequence[int]) -> list[Generation]:
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        requests = [VLLMParams(temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1,
                               top_p=params.top_p, max_tokens=params.max_new_tokens, seed=int(seed), logprobs=0,
                               stop_token_ids=[eos_id]) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                    use_tqdm=False)
        generations = []
        for output in outputs:
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], token_ids)]
            generations.append(Generation(token_ids, logprobs, completion.finish_reason == "stop"))
        return generations
