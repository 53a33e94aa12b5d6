"""Sampling backends behind one interface: the HF engine (any device, the reference) and vLLM (CUDA).

A backend has ``generate(prompt_ids, params, eos_id=..., seeds=...)`` (token ids in, one
:class:`Generation` per prompt out, one seed per prompt, as :func:`alignexp.sampling.engine.generate`),
``sync_weights(model)`` (make it sample the policy's current weights: call after each training round)
and ``cache_tag`` (what identifies its samples in a cache key). :func:`choose_backend` turns the setting
``auto | hf | vllm`` into a backend name and the reason for it; :func:`build_backend` builds it. vLLM
loads the model from an HF-format folder once, then receives the policy's weights in memory; per-token
log-probs are vLLM's raw ones (of the unmodified distribution), as the HF engine reports them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from alignexp.sampling.engine import ENGINE_VERSION, Generation, SamplingParams, generate

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")

MIN_VLLM = "0.10.2"
"""The oldest vLLM the backend supports (the ``gpu`` extra's floor): the V1 engine, whose sampled log-probs
are the raw ones (``logprobs_mode="raw_logprobs"``, set explicitly), ``LLM.apply_model`` to load weights in
place, and sleep mode. Older engines (V0) return processed log-probs and reach the model only through
private attributes: they are refused (:func:`engine_settings`)."""


@dataclass(frozen=True)
class BackendChoice:
    """``name``: "hf" or "vllm"; ``reason``: one line saying why, for the run's log and eval.json."""

    name: str
    reason: str


def vllm_available() -> bool:
    """True where ``vllm`` is installed and a CUDA device is visible."""
    return _vllm_missing() is None


def _vllm_missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    too_old = _vllm_too_old(_installed_vllm_version())
    if too_old:
        return too_old
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def choose_backend(setting: str) -> BackendChoice:
    """The backend for ``setting`` (``auto``: vLLM where it imports and CUDA is present, else the HF engine).

    Raises ValueError for an unknown setting, and RuntimeError for ``vllm`` where vLLM cannot run.
    """
    if setting not in BACKENDS:
        raise ValueError(f"sampling backend must be one of {', '.join(BACKENDS)}, got {setting!r}")
    if setting == "hf":
        return BackendChoice("hf", "the HF engine was asked for (backend=hf)")
    missing = _vllm_missing()
    if setting == "vllm":
        if missing:
            raise RuntimeError(f"backend=vllm, but {missing} (use backend=hf or auto)")
        return BackendChoice("vllm", "vLLM was asked for (backend=vllm)")
    if missing:
        return BackendChoice("hf", f"backend=auto: {missing}, so the HF engine samples")
    return BackendChoice("vllm", "backend=auto: vllm imports and CUDA is present")


def _installed_vllm_version() -> str | None:
    import importlib.metadata

    module = sys.modules.get("vllm")
    if module is not None and getattr(module, "__version__", None):
        return module.__version__
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _vllm_too_old(version: str | None) -> str | None:
    from packaging.version import InvalidVersion, Version

    if version is None:
        return None
    try:
        old = Version(version) < Version(MIN_VLLM)
    except InvalidVersion:
        return f"vllm {version} is not a release version (the backend needs vllm>={MIN_VLLM})"
    return f"vllm {version} is older than {MIN_VLLM} (its V0 engine returns processed log-probs)" if old else None


def engine_settings(version: str, *, dtype: str, gpu_memory_utilization: float, colocate: bool,
                    seed: int) -> tuple[dict[str, object], dict[str, str]]:
    """The ``vllm.LLM`` keyword arguments and the environment for vLLM ``version``.

    Environment: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` always (the engine core in this process, so
    ``apply_model`` runs its closure on the model here, with the weights passed in memory; a separate engine
    process would need them pickled), and ``VLLM_USE_V1=1`` before 0.11 (where V0 still existed).
    Arguments: ``logprobs_mode="raw_logprobs"`` (the unmodified distribution's log-probs, as the HF engine
    reports them), ``enable_sleep_mode`` when colocated. Raises RuntimeError for a vLLM older than
    :data:`MIN_VLLM`."""
    from packaging.version import Version

    too_old = _vllm_too_old(version)
    if too_old:
        raise RuntimeError(f"{too_old}: install vllm>={MIN_VLLM} (pip install 'alignexp[gpu]') or use backend=hf")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if Version(version) < Version("0.11"):
        env["VLLM_USE_V1"] = "1"
    kwargs: dict[str, object] = {"dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
                                 "enable_sleep_mode": colocate, "seed": seed, "logprobs_mode": "raw_logprobs"}
    return kwargs, env


class HFBackend:
    """The HF engine on a model in memory; ``sync_weights`` points it at the model to sample from."""

    name = "hf"

    def __init__(self, model, pad_id: int, batch_size: int = 64):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size

    @property
    def cache_tag(self) -> str:
        return f"hf-engine{ENGINE_VERSION}"

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                 seeds: Sequence[int]) -> list[Generation]:
        return generate(self.model, prompts, params, eos_id=eos_id, pad_id=self.pad_id, seeds=seeds,
                        batch_size=self.batch_size)

    def sync_weights(self, model) -> None:
        self.model = model  # the engine runs the module itself: nothing to copy


def policy_weights(model) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of ``model``'s weights under the plain Hugging Face names that vLLM's
    ``load_weights`` reads: LoRA adapters merged in out of place (the model is not changed), wrapper
    prefixes (PEFT's, activation checkpointing's) removed. Sharded models must be gathered around the
    call (under ZeRO-3, ``deepspeed.zero.GatheredParameters(list(model.parameters()))``)."""
    from alignexp.models.lora import merged_state_dict

    for name, tensor in merged_state_dict(model).items():
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor.detach()


class VLLMBackend:
    """vLLM on the model in ``model_path`` (an HF-format folder), then on the weights given to ``sync_weights``.

    vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, :func:`engine_settings`), so that its
    model can receive the policy's weights in memory. ``colocate``: it shares the training GPU, takes
    ``gpu_memory_utilization`` of it, and sleeps between calls (weights kept in host memory, KV cache
    released); without it, it keeps its memory. ``llm_kwargs`` go to ``vllm.LLM`` as they are (e.g.
    ``max_model_len``, ``enforce_eager``). vLLM on GPUs of its own, in a separate process, is not built.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", gpu_memory_utilization: float = 0.3,
                 colocate: bool = True, seed: int = 0, **llm_kwargs):
        version = _installed_vllm_version()
        kwargs, env = engine_settings(version or "0", dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                      colocate=colocate, seed=seed)
        for key, value in env.items():  # read when vllm is imported and when the engine starts
            if os.environ.get(key, value) != value:
                log.warning("vLLM: %s=%s replaced by %s (the backend needs its engine in this process)", key,
                            os.environ[key], value)
            os.environ[key] = value
        import vllm

        self.version = vllm.__version__
        self.colocate = colocate
        self.llm = vllm.LLM(model=str(model_path), **{**kwargs, **llm_kwargs})
        self.asleep = False
        self._sleep()

    @property
    def cache_tag(self) -> str:
        return f"vllm-{self.version}"

    def _sleep(self) -> None:
        if self.colocate and not self.asleep:
            self.llm.sleep(level=1)  # level 1 keeps a host copy of the weights: waking needs no sync
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _load_weights(self, weights: list[tuple[str, Tensor]]) -> None:
        """``load_weights`` of vLLM's model, through ``LLM.apply_model`` (on the engine in this process)."""
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))

    def sync_weights(self, model) -> None:
        """Load the policy's current weights (:func:`policy_weights`) into vLLM and drop its prefix cache,
        whose keys and values were computed with the old weights."""
        self._wake()
        try:
            self._load_weights(list(policy_weights(model)))
            self.llm.reset_prefix_cache()
        finally:
            self._sleep()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                 seeds: Sequence[int]) -> list[Generation]:
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        if len(seeds) != len(prompts):
            raise ValueError(f"generate: one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts")
        requests = [VLLMParams(temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1,
                               top_p=params.top_p, max_tokens=params.max_new_tokens, seed=int(seed), logprobs=0,
                               stop_token_ids=[eos_id]) for seed in seeds]
        self._wake()
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                        use_tqdm=False)
        finally:
            self._sleep()
        generations = []
        for output in outputs:
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], token_ids)]
            generations.append(Generation(token_ids, logprobs, completion.finish_reason == "stop"))
        return generations


class VLLMEngine(VLLMBackend):
    """vLLM alone on its GPU (what ``alignexp.sample`` builds): 0.85 of its memory, no sleeping between calls."""

    def __init__(self, model_path: str | Path, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 **llm_kwargs):
        super().__init__(model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, colocate=False,
                         **llm_kwargs)


def build_backend(setting: str, model, pad_id: int, *, model_path: str | Path | None = None,
                  batch_size: int = 64, **vllm_options) -> tuple[HFBackend | VLLMBackend, BackendChoice]:
    """The backend for ``setting`` (:func:`choose_backend`) and the choice; vLLM starts from ``model_path``
    (a folder holding the policy's starting weights) and is synced to ``model`` at once."""
    choice = choose_backend(setting)
    if choice.name == "hf":
        return HFBackend(model, pad_id, batch_size), choice
    if model_path is None:
        raise ValueError("the vLLM backend needs model_path: an HF-format folder with the model's architecture")
    backend = VLLMBackend(model_path, **vllm_options)
    if model is not None:
        backend.sync_weights(model)
    return backend, choice
