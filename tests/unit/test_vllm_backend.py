"""Sampling backends: the choice between the HF engine and vLLM, and the vLLM backend driven through a fake
``vllm`` package with vLLM's interface (``LLM.generate`` with per-request ``SamplingParams(seed=...)``,
``TokensPrompt``, the colocated model's ``load_weights``, ``reset_prefix_cache``, ``sleep``/``wake_up``).
vLLM itself cannot be installed here (no CUDA); the fake samples with the tiny HF model it loads."""

from __future__ import annotations

import copy
import importlib.machinery
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample, encode_text, pack, sequence_logps
from alignexp.models.lora import LoraArgs, apply_lora, merged_state_dict
from alignexp.sampling import vllm_backend
from alignexp.sampling.engine import ENGINE_VERSION, SamplingParams, _filter_logits, generate
from alignexp.sampling.text import sample_responses, sample_seed
from alignexp.sampling.vllm_backend import (
    HFBackend,
    VLLMBackend,
    build_backend,
    choose_backend,
    policy_weights,
)


# -- a fake vllm package ---------------------------------------------------------------------------------
@dataclass
class FakeSamplingParams:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class FakeLogprob:
    logprob: float


class FakeModel:
    """The model ``LLM.apply_model`` hands its function in vLLM: ``load_weights`` takes HF names."""

    def __init__(self, hf_model):
        self.hf_model, self.loads = hf_model, 0

    def load_weights(self, weights):
        params = dict(self.hf_model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                if name not in params:
                    raise KeyError(f"vLLM model has no parameter {name}")
                params[name].copy_(tensor)
        self.loads += 1


class FakeLLM:
    def __init__(self, model: str, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                 enable_sleep_mode: bool = False, seed: int = 0, **kwargs):
        import os

        from transformers import AutoModelForCausalLM

        # what a real engine reads when it starts: the backend must have set it before
        self.environment = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_V1")}

        self.kwargs = dict(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           enable_sleep_mode=enable_sleep_mode, seed=seed, **kwargs)
        self.model = FakeModel(AutoModelForCausalLM.from_pretrained(model).eval())
        self.asleep, self.prefix_resets, self.requests = False, 0, []

    def sleep(self, level: int = 1):
        assert self.kwargs["enable_sleep_mode"]
        self.asleep = True

    def wake_up(self, tags=None):
        self.asleep = False

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert not self.asleep, "generate on a sleeping engine"
        self.requests.extend(sampling_params)
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            g = torch.Generator().manual_seed(sp.seed)
            seq, tokens, logprobs, reason = list(prompt["prompt_token_ids"]), [], [], "length"
            for _ in range(sp.max_tokens):
                logits = self.model.hf_model(torch.tensor([seq])).logits[0, -1].float()
                if sp.temperature == 0:
                    token = int(logits.argmax())
                else:
                    filtered = _filter_logits(logits[None] / sp.temperature, max(sp.top_k, 0), sp.top_p)[0]
                    token = int(torch.multinomial(torch.softmax(filtered, -1), 1, generator=g))
                tokens.append(token)
                logprobs.append({token: FakeLogprob(float(torch.log_softmax(logits, -1)[token]))})
                seq.append(token)
                if token in sp.stop_token_ids:
                    reason = "stop"
                    break
            completion = types.SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=reason)
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs


    def apply_model(self, fn):
        """``LLM.apply_model(fn)``: ``fn`` run on the model in each worker (one here)."""
        return [fn(self.model)]


@pytest.fixture(params=["0.10.2", "0.11.0"])
def fake_vllm(monkeypatch, request):
    """A fake vllm of each supported release line: 0.10 (V0 still present, chosen away by VLLM_USE_V1=1) and
    0.11 (V1 only)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.__version__ = request.param
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    module.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # a user's setting that the backend replaces
    monkeypatch.delenv("VLLM_USE_V1", raising=False)  # monkeypatch restores both afterwards
    return module


@pytest.fixture(scope="module")
def tiny():
    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml")))
    tokenizer = build_tokenizer(args)
    return build_model(args, tokenizer).eval(), tokenizer


@pytest.fixture
def saved(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path / "policy")
    return tmp_path / "policy"


def perturbed(model, seed: int):
    """A copy of ``model`` with every weight moved (a training round's worth of change)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other


# -- the choice ------------------------------------------------------------------------------------------
def test_choose_backend_says_why(monkeypatch, fake_vllm):
    assert choose_backend("auto") == vllm_backend.BackendChoice("vllm", "backend=auto: vllm imports and CUDA is "
                                                                        "present")
    assert choose_backend("hf").name == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = choose_backend("auto")
    assert choice.name == "hf" and "no CUDA device is visible" in choice.reason
    with pytest.raises(RuntimeError, match="backend=vllm, but no CUDA device is visible"):
        choose_backend("vllm")
    monkeypatch.delitem(sys.modules, "vllm")
    monkeypatch.setattr(vllm_backend.importlib.util, "find_spec", lambda name: None)
    assert "vllm is not installed" in choose_backend("auto").reason
    with pytest.raises(ValueError, match="sampling backend must be one of auto, hf, vllm, got 'vlm'"):
        choose_backend("vlm")


def test_hf_backend_is_the_engine(tiny):
    model, tokenizer = tiny
    backend, choice = build_backend("hf", model, tokenizer.pad_token_id, batch_size=2)
    assert choice.name == "hf" and isinstance(backend, HFBackend) and backend.cache_tag == f"hf-engine{ENGINE_VERSION}"
    prompts = [encode_text(tokenizer, t, is_prompt=True) for t in ("abc:", "de:", "f:")]
    params = SamplingParams(max_new_tokens=6)
    ours = backend.generate(prompts, params, eos_id=tokenizer.eos_token_id, seeds=[4, 5, 6])
    direct = generate(model, prompts, params, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                      seeds=[4, 5, 6])
    assert [g.token_ids for g in ours] == [g.token_ids for g in direct]
    other = perturbed(model, 0)
    backend.sync_weights(other)
    assert backend.model is other


# -- vLLM through the fake ---------------------------------------------------------------------------------
def test_vllm_backend_sends_per_request_seeds_and_settings(fake_vllm, tiny, saved):
    model, tokenizer = tiny
    backend, choice = build_backend("auto", model, tokenizer.pad_token_id, model_path=saved,
                                    gpu_memory_utilization=0.25)
    assert choice.name == "vllm" and isinstance(backend, VLLMBackend) and backend.cache_tag == f"vllm-{fake_vllm.__version__}"
    assert backend.llm.kwargs["gpu_memory_utilization"] == 0.25 and backend.llm.kwargs["enable_sleep_mode"]
    assert backend.llm.asleep  # colocated: asleep between calls
    prompts = [encode_text(tokenizer, t, is_prompt=True) for t in ("abcd:", "xy:")]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=8)
    eos = tokenizer.eos_token_id
    first = backend.generate(prompts, params, eos_id=eos, seeds=[11, 12])
    again = backend.generate(prompts, params, eos_id=eos, seeds=[11, 12])
    other = backend.generate(prompts, params, eos_id=eos, seeds=[13, 14])
    assert backend.llm.asleep
    assert [g.token_ids for g in first] == [g.token_ids for g in again] != [g.token_ids for g in other]
    request = backend.llm.requests[0]
    assert (request.seed, request.top_k, request.top_p, request.max_tokens, request.logprobs,
            request.stop_token_ids, request.temperature) == (11, -1, 0.95, 8, 0, [eos], 0.9)
    for g in first:  # finished exactly when EOS ends the tokens; log-probs of the unmodified distribution
        assert g.finished == (g.token_ids[-1] == eos) and len(g.logprobs) == len(g.token_ids)
    batch = pack([EncodedExample(p, [g.token_ids]) for p, g in zip(prompts, first)], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        summed = sequence_logps(model, batch)[0][:, 0]
    for g, expected in zip(first, summed.tolist()):
        assert math.isclose(sum(g.logprobs), expected, abs_tol=1e-3)


def test_sync_weights_makes_vllm_sample_the_policy(fake_vllm, tiny, saved):
    """After a training round (weights moved) and ``sync_weights``, vLLM holds the policy's weights, its
    prefix cache is reset, and its greedy samples are the policy's under the HF engine."""
    model, tokenizer = tiny
    policy = perturbed(model, 1)
    backend, _ = build_backend("vllm", policy, tokenizer.pad_token_id, model_path=saved)
    fake = backend.llm.model
    assert fake.loads == 1 and backend.llm.prefix_resets == 1  # synced at once to the policy, not the folder
    trained = perturbed(policy, 2)
    assert not torch.equal(fake.hf_model.lm_head.weight, trained.lm_head.weight)
    backend.sync_weights(trained)
    assert backend.llm.prefix_resets == 2 and backend.llm.asleep
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(fake.hf_model.state_dict()[name], tensor, rtol=0, atol=0)
    prompts = [encode_text(tokenizer, t, is_prompt=True) for t in ("abcd:", "hello:")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours = backend.generate(prompts, greedy, eos_id=eos, seeds=[0, 1])
    engine = generate(trained, prompts, greedy, eos_id=eos, pad_id=pad, seeds=[0, 1])
    assert [g.token_ids for g in ours] == [g.token_ids for g in engine]


def test_sync_weights_merges_lora_without_touching_the_policy(fake_vllm, tiny, saved):
    model, tokenizer = tiny
    policy = apply_lora(copy.deepcopy(model), LoraArgs(r=4, dropout=0.0))
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    names = [name for name, _ in policy_weights(policy)]
    assert names and not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in names)
    backend, _ = build_backend("vllm", policy, tokenizer.pad_token_id, model_path=saved)
    merged = merged_state_dict(policy)
    for name, tensor in backend.llm.model.hf_model.state_dict().items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=0)
    for name, tensor in policy.state_dict().items():  # the adapters were merged out of place
        assert torch.equal(tensor, before[name])


def test_syncing_the_reference_of_a_lora_policy_loads_the_base_weights(fake_vllm, tiny, saved):
    """Evaluation syncs ``AdaptersOff(policy)`` to sample the reference: vLLM must then hold the base weights
    (every one of them), not keep the trained policy's from the sync before."""
    from alignexp.models.lora import AdaptersOff

    model, tokenizer = tiny
    policy = apply_lora(copy.deepcopy(model), LoraArgs(r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    backend, _ = build_backend("vllm", policy, tokenizer.pad_token_id, model_path=saved)
    held = backend.llm.model.hf_model
    assert not torch.equal(held.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    backend.sync_weights(AdaptersOff(policy))
    assert len(list(policy_weights(AdaptersOff(policy)))) == len(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(held.state_dict()[name], tensor, rtol=0, atol=0)


def test_engine_arguments_and_environment_for_each_supported_vllm(fake_vllm, tiny, saved):
    """The engine starts in this process (a user's VLLM_ENABLE_V1_MULTIPROCESSING=1 replaced, not kept), on V1
    (VLLM_USE_V1=1 where 0.10 still had V0), with raw log-probs and sleep mode when colocated."""
    model, tokenizer = tiny
    backend, _ = build_backend("vllm", model, tokenizer.pad_token_id, model_path=saved, gpu_memory_utilization=0.4)
    v1_flag = "1" if fake_vllm.__version__.startswith("0.10") else None
    assert backend.llm.environment == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V1": v1_flag}
    assert backend.llm.kwargs == {"dtype": "auto", "gpu_memory_utilization": 0.4, "enable_sleep_mode": True,
                                  "seed": 0, "logprobs_mode": "raw_logprobs"}
    kwargs, env = vllm_backend.engine_settings("0.12.0", dtype="bfloat16", gpu_memory_utilization=0.85,
                                               colocate=False, seed=3)
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} and kwargs["enable_sleep_mode"] is False


@pytest.mark.parametrize("version", ["0.6.3", "0.8.5", "0.10.1"])
def test_a_vllm_older_than_the_floor_is_refused_or_passed_over(fake_vllm, tiny, saved, version):
    """V0 engines (processed log-probs, no apply_model): backend=vllm refuses, auto samples with the HF engine."""
    fake_vllm.__version__ = version
    with pytest.raises(RuntimeError, match=f"vllm {version} is older than {vllm_backend.MIN_VLLM}"):
        choose_backend("vllm")
    assert choose_backend("auto").name == "hf" and version in choose_backend("auto").reason
    with pytest.raises(RuntimeError, match="older than"):
        VLLMBackend(saved)


def test_the_gpu_extra_floor_is_the_backend_floor():
    tomllib = pytest.importorskip("tomllib")

    extra = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm>={vllm_backend.MIN_VLLM}" in extra["gpu"]


def test_sample_responses_goes_through_the_backend(fake_vllm, tiny, saved):
    """Prompt i's k-th sample uses the stream sample_seed(seed, first_index + i, k), whichever backend."""
    model, tokenizer = tiny
    backend, _ = build_backend("vllm", model, tokenizer.pad_token_id, model_path=saved)
    params = SamplingParams(max_new_tokens=5)
    rows = sample_responses(None, tokenizer, ["abc:", "de:"], 2, params, seed=3, first_index=4, backend=backend)
    assert [len(r) for r in rows] == [2, 2]
    assert [r.seed for r in backend.llm.requests] == [sample_seed(3, i, k) for i in (4, 5) for k in (0, 1)]


def test_vllm_backend_needs_a_folder(fake_vllm, tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="needs model_path"):
        build_backend("vllm", model, tokenizer.pad_token_id)


def test_the_gpu_sampling_benchmark_runs_on_cpu(fake_vllm):
    """``python -m alignexp.bench.gpu_sampling --device cpu --size tiny`` (the GPU script's code, in seconds):
    both backends sample every prompt to the token cap, and vLLM is synced from the model in memory."""
    from alignexp.bench import gpu_sampling

    record = gpu_sampling.run(gpu_sampling.parse_args(["--device", "cpu", "--size", "tiny", "--layers", "1",
                                                       "--prompts", "3", "--prompt-len", "5", "--new-tokens", "2",
                                                       "--batch", "2"]))
    assert 3 <= record["hf"]["tokens"] <= 6 and 3 <= record["vllm"]["tokens"] <= 6 and record["vllm"]["version"] == fake_vllm.__version__
    assert record["vllm_over_hf_tokens_per_s"] > 0 and record["vllm"]["sync_weights_s"] >= 0


def test_the_standalone_engine_keeps_its_gpu(fake_vllm, saved):
    """alignexp.sample's VLLMEngine: vLLM alone on the GPU, as before (0.85 of it, never asleep)."""
    engine = vllm_backend.VLLMEngine(saved)
    assert engine.llm.kwargs["gpu_memory_utilization"] == 0.85 and not engine.llm.kwargs["enable_sleep_mode"]
    assert not engine.asleep


# -- the run's sampling through the backend ------------------------------------------------------------------
def test_a_run_samples_its_rankings_and_evaluation_through_vllm(fake_vllm, tiny, compose, tmp_path, monkeypatch):
    """``backend=vllm``: the preference data and the evaluation's samples come from the (stand-in) vLLM engine,
    given the reference's and the policy's weights before each sampling; eval.json says what sampled."""
    import json

    from alignexp.train import run

    model, tokenizer = tiny
    start = tmp_path / "start"
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    engines = []
    real = fake_vllm.LLM

    def keep(*args, **kwargs):
        engines.append(real(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(fake_vllm, "LLM", keep)
    cfg = compose("loss=dpo", "debug=fast", "backend=vllm", "hardware=cpu", f"init_from={start}",
                  "task.n_train_prompts=8", "task.n_eval_prompts=4", "eval.max_new_tokens=6",
                  "model.max_response_len=6")
    run(cfg)
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["sampling"] == {"backend": "vllm", "reason": "vLLM was asked for (backend=vllm)",
                                  "engine": f"vllm-{fake_vllm.__version__}"}
    engine = engines[0]
    assert len(engines) == 1
    # 8 prompts x 4 responses for the rankings; 4 prompts x (policy + reference) at the one temperature
    assert len(engine.requests) == 8 * 4 + 4 * 2
    assert engine.model.loads >= 3  # synced to the reference, then to the policy and the reference again
