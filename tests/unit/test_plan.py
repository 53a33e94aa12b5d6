"""``alignexp.plan``: parameter counts from the architecture, model states against DeepSpeed's own
estimators, activations against what autograd keeps for the tiny model, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from alignexp.models.lora import LoraArgs
from alignexp.scale.hardware import HardwareArgs
from alignexp.scale.plan import (
    GIB,
    activation_bytes,
    count_parameters,
    model_state_bytes,
    plan_inputs,
    plan_memory,
)
from tests.conftest import REPO, allocated_bytes_over_time

# Published sizes: Llama-7B 6,738,415,616 (Touvron et al. 2023, the 6.7B row), Mistral-7B 7,241,732,096.
EXPECTED_PARAMS = {"llama7b": 6_738_415_616, "mistral7b": 7_241_732_096, "zephyr7b": 7_241_732_096}
SEVEN_B = sorted(EXPECTED_PARAMS)


def _arch(compose, model: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(f"model={model}").model.arch, resolve=True)


@pytest.mark.parametrize("model", SEVEN_B)
def test_parameter_count_of_the_7b_configs(compose, model):
    counts = count_parameters(_arch(compose, model))
    assert counts.total == EXPECTED_PARAMS[model]
    assert counts.largest_module == 32_000 * 4096  # the embedding (and the untied head)


@pytest.mark.parametrize("model", ["llama7b", "mistral7b"])
def test_closed_form_count_equals_the_model_built_on_the_meta_device(compose, model):
    """Two layers of each architecture, built by transformers on the meta device and counted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = {**_arch(compose, model), "num_hidden_layers": 2}
    counts = count_parameters(arch)
    config_args = dict(arch)
    config = AutoConfig.for_model(config_args.pop("model_type"), **config_args)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    assert counts.total == sum(p.numel() for p in built.parameters())
    assert counts.largest_module == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())


def test_lora_trainable_count_equals_peft(compose):
    """LoRA r=8 on q, v of a 2-layer Mistral-7B-shaped model: the count equals PEFT's own."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = {**_arch(compose, "mistral7b"), "num_hidden_layers": 2}
    lora = LoraArgs(r=8, target_modules=["q_proj", "v_proj"])
    config_args = dict(arch)
    config = AutoConfig.for_model(config_args.pop("model_type"), **config_args)
    with torch.device("meta"):
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config),
                                    LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(arch, lora).trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# (hardware option, overrides, DeepSpeed estimator, its keyword arguments)
DEEPSPEED_CASES = [
    ("deepspeed_zero2", {}, "zero2", {"cpu_offload": False}),
    ("deepspeed_zero2", {"offload_optimizer": True}, "zero2", {"cpu_offload": True}),
    ("deepspeed_zero3", {}, "zero3", {"cpu_offload": False, "cpu_offload_params": False}),
    ("deepspeed_zero3", {"offload_optimizer": True}, "zero3", {"cpu_offload": True, "cpu_offload_params": False}),
    ("deepspeed_zero3_offload", {}, "zero3", {"cpu_offload": True, "cpu_offload_params": True}),
]
GPU_LAYOUTS = [(1, 1), (8, 1), (8, 2)]  # (GPUs per node, nodes)


@pytest.fixture(scope="module")
def deepspeed_estimators():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return {"zero2": estimate_zero2_model_states_mem_needs, "zero3": estimate_zero3_model_states_mem_needs}


def test_model_states_agree_with_deepspeed_within_10_percent(compose, deepspeed_estimators, capsys):
    """Per-GPU model-state bytes for the 7B configs under every DeepSpeed option and GPU layout.

    DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` print these same functions'
    numbers (they run on CPU from parameter counts); here the functions are called directly.
    """
    rows = []
    for model in SEVEN_B:
        counts = count_parameters(_arch(compose, model))
        for option, extra, stage, kwargs in DEEPSPEED_CASES:
            hw_cfg = {k: v for k, v in compose(f"hardware={option}").hardware.items()}
            for per_node, nodes in GPU_LAYOUTS:
                hw = HardwareArgs(**{**hw_cfg, **extra, "devices": per_node, "num_nodes": nodes})
                ours = model_state_bytes(counts, hw, "bfloat16", hw.world_size).gpu
                if stage == "zero2":
                    _, theirs = deepspeed_estimators[stage](counts.total, per_node, nodes, **kwargs)
                else:
                    _, theirs, _ = deepspeed_estimators[stage](counts.total, counts.largest_module, per_node,
                                                               nodes, zero_init=True, **kwargs)
                rows.append((model, option + ("+offload_optimizer" if extra else ""), per_node * nodes, ours, theirs))
    with capsys.disabled():
        print("\nmodel      option                            GPUs   plan GiB  DeepSpeed GiB  ratio")
        for model, option, gpus, ours, theirs in rows:
            print(f"{model:<10} {option:<33} {gpus:>4} {ours / GIB:>10.2f} {theirs / GIB:>14.2f}  {ours / theirs:.4f}")
    for model, option, gpus, ours, theirs in rows:
        assert abs(ours / theirs - 1) <= 0.10, (model, option, gpus, ours, theirs)


def _profiled_bytes_kept(fn) -> int:
    """CPU bytes allocated inside ``fn`` and still alive when it returns (torch profiler's allocator counter)."""
    return allocated_bytes_over_time(fn)[-1]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_keeps(checkpointing):
    """A 3-layer GQA Mistral (h=256, i=704, 4 heads, 2 KV heads), fp32 on CPU, 2 rows of a 64-token
    prompt and 4 responses of 32: the bytes alive after the packed forward vs the plan's ``saved``."""
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.logprobs import EncodedExample, pack, sequence_logps
    from alignexp.models.tokenizer import build_byte_tokenizer

    arch = dict(model_type="mistral", hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    tokenizer = build_byte_tokenizer()
    model = build_model(ModelArgs(arch=arch, gradient_checkpointing=checkpointing), tokenizer).train()
    generator = torch.Generator().manual_seed(0)
    rows, prompt_len, response_len, n = 2, 64, 32, 4
    batch = pack([EncodedExample(torch.randint(0, 256, (prompt_len,), generator=generator).tolist(),
                                 [torch.randint(0, 256, (response_len,), generator=generator).tolist()
                                  for _ in range(n)]) for _ in range(rows)], pad_id=tokenizer.pad_token_id)
    kept: dict = {}
    measured = _profiled_bytes_kept(lambda: kept.setdefault("logps", sequence_logps(model, batch)[0]))
    counts = count_parameters({**arch, "vocab_size": len(tokenizer)})
    estimate = activation_bytes(counts, rows, prompt_len, response_len, n, act_bytes=4, checkpointing=checkpointing,
                                reference_forward=False).saved
    print(f"checkpointing={checkpointing}: measured {measured} bytes, estimated {int(estimate)}")
    assert 0.9 <= estimate / measured <= 1.15


def test_plan_of_a_7b_lora_run_and_the_frozen_reference(compose):
    lora = plan_memory(plan_inputs(compose("model=mistral7b", "hardware=gpu", "model.lora.enabled=true",
                                           "train.batch_size=1")))
    assert lora.inputs.reference == "adapters_off" and lora.reference_weights == 0
    assert lora.counts.trainable == 32 * 16 * (4096 + 4096 + 2 * (4096 + 1024) + 4096 + 4096)
    assert lora.fits
    frozen = plan_memory(plan_inputs(compose("model=mistral7b", "hardware=deepspeed_zero3", "hardware.devices=8",
                                             "train.reference=frozen")))
    assert frozen.reference_weights == pytest.approx(2 * frozen.counts.total / 8)
    full = plan_memory(plan_inputs(compose("model=mistral7b", "hardware=gpu", "model.dtype=float32")))
    assert full.fits is False  # 16 bytes per parameter: 108 GiB of model states on one 80 GiB GPU
    assert full.states.gpu / GIB > 100


def test_plan_needs_a_definite_device_count(compose):
    with pytest.raises(ValueError, match="hardware.devices"):
        plan_inputs(compose("model=llama7b", "hardware=deepspeed_zero3"))  # devices: auto


def test_cli_prints_the_plan_and_exits_with_the_verdict(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "alignexp.plan", "model=llama7b", "hardware=deepspeed_zero3",
               "hardware.devices=8", "train.batch_size=2"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["fits"] is True and record["gpus"] == 8 and record["params"] == EXPECTED_PARAMS["llama7b"]
    assert "fits: yes" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no run folder, no log file


def test_a_run_that_does_not_fit_exits_1(compose, capsys):
    from alignexp.scale.plan import _main

    with pytest.raises(SystemExit) as info:
        _main(compose("model=llama7b", "hardware=gpu", "model.dtype=float32"))
    assert info.value.code == 1 and "fits: NO" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        _main(compose("model=llama7b", "hardware=deepspeed_zero3"))  # devices: auto, no GPU count to plan for
    assert info.value.code == 2 and "hardware.devices" in capsys.readouterr().err


def test_hardware_auto_is_planned_as_it_resolves(compose, capsys):
    """The headline config with hardware=auto on 8 GPUs of 80 GiB: DDP's replicas (about 156 GiB per GPU)
    do not fit, so auto means ZeRO-3, as choose_auto decides on the machine; 640 GiB per GPU holds DDP."""
    from alignexp.scale.plan import _main, resolve_auto_inputs

    headline = ("loss=ranked_dpo", "task=tldr", "model=mistral7b", "hardware.devices=8")
    inputs, line = resolve_auto_inputs(plan_inputs(compose(*headline, "+plan.gpu_memory_gib=80")))
    assert inputs.hardware.name == "deepspeed_zero3" and inputs.hardware.zero_stage == 3
    assert "under DDP the plan's peak is" in line
    roomy, line = resolve_auto_inputs(plan_inputs(compose(*headline, "+plan.gpu_memory_gib=640")))
    assert roomy.hardware.name == "ddp" and roomy.hardware.devices == 8
    one, _ = resolve_auto_inputs(plan_inputs(compose(*headline[:3], "hardware.devices=1")))
    assert one.hardware.name == "gpu" and one.gpus == 1
    unknown, line = resolve_auto_inputs(plan_inputs(compose(*headline)))
    assert unknown.hardware.name == "ddp" and "plan.gpu_memory_gib" in line
    _main(compose(*headline, "+plan.gpu_memory_gib=80"))
    assert "hardware=auto: deepspeed_zero3" in capsys.readouterr().out


def test_vllm_memory_is_in_the_stage_plan(compose):
    """Where vLLM samples (one GPU): its share (gpu_memory_utilization x memory) and its CUDA graphs in the sampling
    and evaluation stages instead of the HF engine's batch, the graphs alone while it sleeps in training, the KV
    cache its share leaves after its weights (worked by hand for Mistral-7B), and no fit where the share cannot
    hold its weights; several processes sample with the HF engine."""
    from alignexp.scale.plan_stages import VLLM_ACTIVATION_FRACTION, plan_run

    run = ("model=mistral7b", "hardware=gpu", "model.lora.enabled=true", "hardware.gpu_memory_gib=80")
    plan = plan_run(plan_inputs(compose(*run, "backend=vllm", "vllm.gpu_memory_utilization=0.4")))
    stages = {stage.name: stage.parts for stage in plan.peaks}
    assert stages["sampling"]["vLLM share"] == pytest.approx(0.4 * 80 * GIB)
    assert stages["sampling"]["vLLM CUDA graphs"] == GIB and "generation" not in stages["sampling"]
    assert stages["training"]["vLLM asleep (CUDA graphs)"] == GIB
    weights = 2 * EXPECTED_PARAMS["mistral7b"]  # bf16
    kv_per_token = 2 * 32 * 8 * 128 * 2  # K and V x 32 layers x 8 KV heads x head dim 128 x 2 bytes
    expected = int((0.4 * 80 * GIB * (1 - VLLM_ACTIVATION_FRACTION) - weights) // kv_per_token)
    assert plan.vllm.kv_tokens == expected and 100_000 < expected < 200_000
    assert plan.fits is True and "KV cache for" in plan.table()
    assert plan.record()["sampling"]["vllm"]["share_gib"] == pytest.approx(32.0)

    eager = plan_run(plan_inputs(compose(*run, "backend=vllm", "vllm.enforce_eager=true")))
    assert eager.vllm.graphs == 0 and {s.name: s.parts for s in eager.peaks}["training"]["vLLM asleep (CUDA graphs)"] == 0
    too_small = plan_run(plan_inputs(compose(*run, "backend=vllm", "vllm.gpu_memory_utilization=0.1")))
    assert too_small.vllm.kv_tokens == 0 and too_small.fits is False and "NO room for a KV cache" in too_small.table()
    hf = plan_run(plan_inputs(compose(*run, "backend=hf")))
    assert hf.vllm is None and "generation" in {s.name: s.parts for s in hf.peaks}["sampling"]
    several = plan_run(plan_inputs(compose("model=mistral7b", "hardware=deepspeed_zero3", "hardware.devices=8",
                                           "backend=vllm")))
    assert several.vllm is None and "8 processes share the sampling" in several.training.inputs.backend_reason


def test_vllm_settings_reach_the_engine(compose):
    """``vllm.*`` is checked and given to the engine as vllm.LLM's keyword arguments."""
    from alignexp.config import validate
    from alignexp.errors import ConfigError

    args = validate(compose("vllm.gpu_memory_utilization=0.5", "vllm.enforce_eager=true", "vllm.max_model_len=2048"))
    assert args.vllm.engine_options() == {"gpu_memory_utilization": 0.5, "enforce_eager": True, "max_model_len": 2048}
    with pytest.raises(ConfigError, match="vllm.gpu_memory_utilization"):
        validate(compose("vllm.gpu_memory_utilization=1.5"))
