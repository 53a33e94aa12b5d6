"""The hardware group: every option builds its strategy and a Trainer (GPU ones with CUDA faked: the
Trainer is constructed, not fitted), DDP fits on one CPU process, bad values name the key, the
FlashAttention-2 route for block masks, sweeps (joblib, SLURM through a fake sbatch), and the GPU
check's CPU mode on an interpreter without Hydra, OmegaConf, datasets or DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR, validate
from alignexp.scale.hardware import HardwareArgs, build_strategy, choose_auto, trainer_kwargs
from alignexp.scale.strategies import DecoderLayers, called_units
from tests.conftest import REPO

HARDWARE = sorted(p.stem for p in (Path(CONF_DIR) / "hardware").glob("*.yaml"))
EXPECTED_HARDWARE = ["auto", "cpu", "ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp", "gpu"]


def test_the_hardware_options_are_the_documented_ones():
    assert HARDWARE == EXPECTED_HARDWARE


def _hardware(compose, *overrides: str) -> HardwareArgs:
    cfg = compose(*overrides)
    validate(cfg)
    return HardwareArgs(**OmegaConf.to_container(cfg.hardware, resolve=True))


@pytest.fixture
def fake_cuda():
    """Eight CUDA devices as far as Lightning's Trainer constructor can tell (nothing runs on them)."""
    import lightning.pytorch.accelerators.cuda as cuda_accelerator

    with mock.patch.object(cuda_accelerator.CUDAAccelerator, "is_available", staticmethod(lambda: True)), \
            mock.patch("lightning.fabric.accelerators.cuda.num_cuda_devices", lambda: 8), \
            mock.patch("lightning.pytorch.accelerators.cuda.num_cuda_devices", lambda: 8), \
            mock.patch("torch.cuda.is_available", lambda: True), mock.patch("torch.cuda.device_count", lambda: 8):
        yield


def _tiny_decoder_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                         num_key_value_heads=2), layer_idx=0)


@pytest.mark.parametrize("option", [h for h in HARDWARE if h != "auto"])
def test_every_option_builds_its_strategy_and_trainer(compose, fake_cuda, option):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from alignexp.scale.strategies import FSDP2

    if option.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    hw = _hardware(compose, f"hardware={option}")
    assert hw.name == option
    trainer = L.Trainer(**trainer_kwargs(hw), logger=False, enable_checkpointing=False, enable_progress_bar=False)
    strategy, precision = trainer.strategy, trainer.precision_plugin
    if option == "cpu":
        assert isinstance(strategy, SingleDeviceStrategy) and strategy.root_device.type == "cpu"
        assert type(precision).__name__ == "Precision"
        return
    assert hw.precision == "bf16-mixed" and hw.gpu_memory_gib == 80
    if option == "gpu":
        assert isinstance(strategy, SingleDeviceStrategy) and strategy.root_device.type == "cuda"
        assert type(precision).__name__ == "MixedPrecision" and precision.precision == "bf16-mixed"
    elif option == "ddp":
        assert isinstance(strategy, DDPStrategy) and trainer.world_size == 8  # devices: auto -> all 8
        assert type(precision).__name__ == "MixedPrecision"
    elif option == "fsdp":  # FSDP2: bf16 compute through its MixedPrecisionPolicy, fp32 shards (master weights)
        assert isinstance(strategy, FSDP2) and trainer.world_size == 8 and strategy._data_parallel_size == 8
        assert strategy.mixed_precision and strategy.reshard_after_forward and strategy.activation_checkpointing
        assert type(precision).__name__ == "Precision"
        assert strategy.layers(_tiny_decoder_layer()) is True
    else:
        assert isinstance(strategy, DeepSpeedStrategy) and trainer.world_size == 8
        assert type(precision).__name__ == "DeepSpeedBatchPrecision" and precision.precision == "bf16-mixed"
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == hw.zero_stage == (2 if option == "deepspeed_zero2" else 3)
        offloaded = option.endswith("offload")
        assert ("offload_optimizer" in zero) == offloaded and ("offload_param" in zero) == offloaded
        if offloaded:
            assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
            assert strategy.config["zero_force_ds_cpu_optimizer"] is False


def test_multi_node_settings_reach_the_trainer(compose, fake_cuda):
    hw = _hardware(compose, "hardware=ddp", "hardware.devices=4", "hardware.num_nodes=2")
    trainer = L.Trainer(**trainer_kwargs(hw), logger=False, enable_checkpointing=False)
    assert (trainer.num_devices, trainer.num_nodes, trainer.world_size, hw.world_size) == (4, 2, 8, 8)


def test_each_call_builds_a_fresh_strategy(compose):
    hw = _hardware(compose, "hardware=ddp")
    assert build_strategy(hw) is not build_strategy(hw)  # a Trainer takes ownership of its strategy


def _tiny_preference_module():
    from alignexp.lightning_modules.preference import OptimArgs, PreferenceModule
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.logprobs import EncodedExample, pack
    from alignexp.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    arch = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    policy = build_model(ModelArgs(arch=arch), tokenizer)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        batch = pack([EncodedExample(torch.randint(0, 256, (6,), generator=generator).tolist(),
                                     [torch.randint(0, 256, (4,), generator=generator).tolist() for _ in range(2)])
                      for _ in range(2)], pad_id=tokenizer.pad_token_id)
        batch.ref_logps = torch.full(batch.lengths.shape, -20.0)
        batches.append(batch)
    loader = torch.utils.data.DataLoader(batches, batch_size=1, collate_fn=lambda items: items[0])
    return PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=1e-2)), loader


@pytest.mark.parametrize("overrides", [
    ("hardware=cpu",),
    ("hardware=ddp", "hardware.accelerator=cpu", "hardware.devices=1", "hardware.precision=32-true"),
])
def test_fits_on_cpu(compose, tmp_path, overrides):
    """The CPU option, and DDP as one CPU process (Gloo); FSDP and DeepSpeed need CUDA in Lightning."""
    from lightning.pytorch.strategies import DDPStrategy

    hw = _hardware(compose, *overrides)
    module, loader = _tiny_preference_module()
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = L.Trainer(**trainer_kwargs(hw), max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    try:
        trainer.fit(module, train_dataloaders=loader)
        if hw.strategy == "ddp":
            assert isinstance(trainer.strategy, DDPStrategy) and torch.distributed.get_backend() == "gloo"
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))


@pytest.mark.parametrize("override, key", [
    ("hardware.strategy=horovod", "hardware.strategy"),
    ("hardware.precision=8-true", "hardware.precision"),
    ("hardware.devices=0", "hardware.devices"),
    ("hardware.num_nodes=0", "hardware.num_nodes"),
    ("+hardware.zero_stage=3", "hardware.zero_stage"),
])
def test_bad_values_name_the_key(compose, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _hardware(compose, override)


@pytest.mark.parametrize("option", ["deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_accumulates_and_reduces_gradients_in_fp32(compose, option):
    """DeepSpeed's gradient accumulation and reduction dtypes default to the model's (bf16 under bf16-mixed): the
    config sets both to fp32, and DeepSpeed 0.19's own config parser reads them so."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    strategy = build_strategy(_hardware(compose, f"hardware={option}"))
    assert strategy.config["data_types"]["grad_accum_dtype"] == "fp32"
    assert strategy.config["communication_data_type"] == "fp32"
    parsed = DeepSpeedConfig({**strategy.config, "train_micro_batch_size_per_gpu": 1,
                              "gradient_accumulation_steps": 1, "train_batch_size": 1, "bf16": {"enabled": True}})
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32


def test_fsdp_wraps_the_blocks_each_model_declares():
    """Per-layer units from the model's own ``_no_split_modules``: GPT-2, GPT-J and GPT-NeoX name their blocks
    ``GPT2Block``, ``GPTJBlock``, ``GPTNeoXLayer``, which a rule on ``*DecoderLayer`` misses."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
    )

    models = {"GPT2Block": GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=40)),
              "GPTJBlock": GPTJForCausalLM(GPTJConfig(n_embd=16, n_layer=3, n_head=2, rotary_dim=4, vocab_size=40)),
              "GPTNeoXLayer": GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_hidden_layers=3,
                                                               num_attention_heads=2, intermediate_size=32,
                                                               vocab_size=40))}
    for block, model in models.items():
        is_layer = DecoderLayers().of(model)
        assert [type(m).__name__ for m in model.modules() if is_layer(m)] == [block] * 3
        assert not any(DecoderLayers()(m) for m in model.modules())  # the old rule found none
    assert DecoderLayers(["GPT2Block"]).of(models["GPTJBlock"]).names == {"GPT2Block"}  # names given win


def test_fsdp_cpu_offload_leaves_the_offloaded_parameters_in_host_memory():
    """After sharding, the model goes to the device, except, under ``cpu_offload``, its parameters: FSDP2's lazy
    init refuses a CPUOffloadPolicy parameter that is not on the CPU. The device here is ``meta`` (standing in
    for the GPU), so what moved can be seen on a CPU machine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignexp.scale.strategies import FSDP2

    class OnMeta(FSDP2):
        root_device = torch.device("meta")

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=40)
    for offload in (True, False):
        strategy = OnMeta(1, mixed_precision=True, cpu_offload=offload)
        strategy.model = LlamaForCausalLM(config)
        moved = []
        strategy.model_to_device = lambda moved=moved: moved.append(True)
        strategy.place_model()
        buffers = [b.device.type for b in strategy.model.buffers()]
        if offload:
            assert not moved and buffers and set(buffers) == {"meta"}
            assert {p.device.type for p in strategy.model.parameters()} == {"cpu"}
        else:
            assert moved == [True]


def test_deepspeed_settings_are_checked(compose):
    with pytest.raises(ValueError, match=r"hardware\.zero_stage must be one of 1, 2, 3"):
        _hardware(compose, "hardware=deepspeed_zero3", "hardware.zero_stage=4")
    with pytest.raises(ValueError, match=r"hardware\.offload_parameters needs hardware\.zero_stage=3"):
        _hardware(compose, "hardware=deepspeed_zero2", "hardware.offload_parameters=true")


def test_old_yaml_fields_alone_still_work():
    hw = HardwareArgs(name="cpu", accelerator="cpu", devices=1, num_nodes=1, precision="32-true", strategy="auto",
                      threads=2)
    assert trainer_kwargs(hw) == {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32-true",
                                  "strategy": "auto"}


def test_fsdp_units_are_decoder_layers_and_the_modules_the_log_prob_code_calls():
    from transformers import LlamaConfig, LlamaForCausalLM

    layer = _tiny_decoder_layer()
    assert DecoderLayers()(layer) is True and DecoderLayers(["MistralDecoderLayer"])(layer) is False
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=40, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    assert called_units(model) == [model.model, model.lm_head]  # each its own FSDP2 root
    tied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="ties its output head"):
        called_units(tied)


def test_auto_picks_the_cpu_without_cuda_and_ddp_or_zero3_by_the_plan(compose, fake_cuda):
    """hardware=auto: DDP on all 8 (faked) GPUs for the tiny model; ZeRO-3 for full DPO of a 7B model, which
    the plan puts above 80 GiB per GPU under DDP; the CPU option (as hardware=cpu) without CUDA."""
    tiny = validate(compose("hardware.gpu_memory_gib=80"))
    hw, why = choose_auto(tiny.hardware, tiny)
    assert (hw.name, hw.strategy, hw.devices, hw.precision) == ("ddp", "ddp", 8, "bf16-mixed") and "DDP" in why
    big = validate(compose("model=mistral7b", "loss=dpo", "hardware.gpu_memory_gib=80"))
    hw, why = choose_auto(big.hardware, big)
    assert (hw.name, hw.strategy, hw.zero_stage) == ("deepspeed_zero3", "deepspeed", 3) and "ZeRO-3" in why
    with mock.patch("torch.cuda.is_available", lambda: False):
        hw, why = choose_auto(tiny.hardware, tiny)
    cpu = _hardware(compose, "hardware=cpu")
    assert (hw.name, hw.accelerator, hw.devices, hw.precision, hw.threads) == \
        (cpu.name, cpu.accelerator, cpu.devices, cpu.precision, cpu.threads) and why == "no CUDA device"


def test_block_masks_go_to_sdpa_under_flash_attention_2(monkeypatch):
    """A model set to flash_attention_2 runs the packed forward's 4D mask through SDPA (same log-probs as
    an SDPA model) and hands 2D-mask calls (generation) to FlashAttention-2, here a stand-in."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    from alignexp.models.backbone import ModelArgs, build_model, route_block_masks_to_sdpa
    from alignexp.models.logprobs import EncodedExample, pack, sequence_logps
    from alignexp.models.tokenizer import build_byte_tokenizer

    calls: list[tuple[int, ...] | None] = []

    def fake_flash(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append(None if attention_mask is None else tuple(attention_mask.shape))
        return sdpa_attention_forward(module, query, key, value, None, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", fake_flash)
    route_block_masks_to_sdpa()
    route_block_masks_to_sdpa()  # idempotent
    assert AttentionInterface._global_mapping["flash_attention_2"].routes_block_masks_to_sdpa

    tokenizer = build_byte_tokenizer()
    arch = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = build_model(ModelArgs(arch=arch), tokenizer).eval()
    batch = pack([EncodedExample([1, 2, 3, 4, 5], [[6, 7, 8], [9, 10], [11, 12, 13, 14]])], pad_id=0)
    expected = sequence_logps(model, batch)[0]
    model.config._attn_implementation = "flash_attention_2"
    assert torch.allclose(sequence_logps(model, batch)[0], expected, atol=1e-5)
    assert calls == []  # the block mask never reached FlashAttention-2
    model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    assert len(calls) == 2  # one call per layer, no 4D mask


def test_attention_choice_and_its_log_line(caplog):
    from alignexp.models.backbone import ModelArgs, attention_implementation, build_model
    from alignexp.models.tokenizer import build_byte_tokenizer

    assert attention_implementation("auto", "cpu") == "sdpa"
    with mock.patch("importlib.util.find_spec", lambda name: object() if name == "flash_attn" else None):
        assert attention_implementation("auto", "cuda") == "flash_attention_2"
    with mock.patch("importlib.util.find_spec", lambda name: None):
        assert attention_implementation("auto", "cuda") == "sdpa"
    arch = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2)
    with caplog.at_level("INFO", logger="alignexp.models.backbone"):
        build_model(ModelArgs(arch=arch), build_byte_tokenizer())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]
    assert lines == ["attention: sdpa (torch scaled_dot_product_attention; on cpu)"]


# -- sweeps -------------------------------------------------------------------------------------

SWEEP_APP = """
import hydra

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    print("job beta", cfg.loss.beta, flush=True)
    if cfg.loss.beta == 0.2:
        raise ValueError("diverged at beta=0.2")
    return cfg.loss.beta

if __name__ == "__main__":
    main()
"""


def _sweep_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", **extra}


def test_parallel_sweep_runs_every_job_and_reports_each_failure(tmp_path):
    """joblib: all three jobs run although one fails; the sweep exits non-zero and jobs.jsonl lists them."""
    (tmp_path / "app.py").write_text(SWEEP_APP.format(conf=CONF_DIR))
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "app.py", "-m", "hydra/launcher=parallel", "loss=dpo", "loss.beta=0.1,0.2,0.3",
         f"hydra.sweep.dir={sweep}"],  # train.yaml enables alignexp.scale.hardware.JobStatusCallback
        cwd=tmp_path, env=_sweep_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "diverged at beta=0.2" in result.stderr
    records = sorted((json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()),
                     key=lambda r: r["num"])
    assert [r["status"] for r in records] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert records[1]["error"] == "ValueError: diverged at beta=0.2" and "loss.beta=0.2" in records[1]["overrides"]
    # progress: the sweep's size written when it started, and each job's line counts the finished ones
    assert (sweep / "jobs_total").read_text() == "3\n"
    assert "3 of 3 jobs finished" in result.stdout + result.stderr


def test_slurm_launcher_submits_one_array_with_the_hardware_layout(tmp_path):
    """The real submitit launcher against a fake SLURM (sbatch records the script; sacct reports the
    array's jobs FAILED, as a crashed job would be): the #SBATCH lines, and a non-zero exit naming the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'for a in "$@"; do f="$a"; done\ncp "$f" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"',
        "srun": "exit 0",
        "sacct": 'echo "JobID|State|NodeList"\nfor i in 0 1 2 3; do echo "4242_$i|FAILED|node$i"; done',
        "scancel": "exit 0",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "app.py").write_text(SWEEP_APP.format(conf=CONF_DIR))
    result = subprocess.run(
        [sys.executable, "app.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
         "hardware=deepspeed_zero3", "hardware.num_nodes=2", "loss=dpo", "loss.beta=0.1,0.2,0.3",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=_sweep_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}"), capture_output=True,
        text=True, timeout=300)
    submitted = (tmp_path / "submitted.sh").read_text()
    for line in ("--array=0-2%3", "--gpus-per-node=8", "--ntasks-per-node=8", "--nodes=2", "--partition=gpu",
                 "--time=240", "--cpus-per-task=8", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in submitted, line
    assert result.returncode != 0 and "4242_0" in result.stderr and "FAILED" in result.stderr


# -- the GPU check ------------------------------------------------------------------------------

def test_gpu_check_runs_on_cpu_without_hydra_omegaconf_datasets_or_deepspeed(tmp_path):
    """``scripts/gpu_check.sh --device cpu --size tiny``, with those packages made unimportable (as on a
    GPU machine that lacks them): it trains and prints the JSON record."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        for name in ("hydra", "omegaconf", "datasets", "deepspeed"):
            sys.modules[name] = None  # any import of them raises ImportError
    """))
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(blocker), "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp_path)}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--size", "tiny", "--layers", "1", "--steps", "2",
         "--warmup", "1", "--batch", "2", "--prompt-len", "12", "--response-len", "6", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record == json.loads(out.read_text())
    assert record["strategy"] == "cpu" and record["attention"] == "sdpa" and record["steps_timed"] == 2
    assert record["tokens_per_step"] == 2 * (12 + 4 * 6) and record["tokens_per_s"] > 0
    assert record["packing_max_abs_diff"] < 1e-4  # a response scores the same packed with its siblings or alone
    assert record["mfu"] is None and record["peak_memory_gib"] > 0 and record["ok"]
    parity = record["checks"]["packed_parity"]
    # packed = a plain HF forward, with a sliding window (32) shorter than the sequences (72)
    assert parity["ok"] and parity["max_abs_diff_float32"] <= parity["tolerance"] and parity["window"] == 32
    assert parity["attention_float32"] == "sdpa"
    assert record["checks"]["zero3"]["skipped"] and 0 < record["attention_flops_share"] < 1


def test_peak_flops_table():
    from alignexp.gpu_check.check import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("some new card") is None


@pytest.mark.slow
def test_zero3_under_bf16_accumulates_and_reduces_in_fp32_in_a_real_engine(tmp_path):
    """A ZeRO-3 fit under bf16-mixed on DeepSpeed's CPU accelerator: the engine's model dtype is bf16, its
    gradient accumulation and communication dtypes fp32 (DeepSpeed 0.19's own answers, read at the first step)."""
    pytest.importorskip("deepspeed")
    import dataclasses

    from alignexp.args import OptimArgs
    from alignexp.gpu_check.zero3 import hardware_option
    from alignexp.lightning_modules.datamodule import RankingDataset, make_loader
    from alignexp.lightning_modules.preference import PreferenceModule
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.logprobs import EncodedExample
    from alignexp.models.tokenizer import build_byte_tokenizer
    from alignexp.pipeline.fit import fit

    hw = dataclasses.replace(hardware_option("deepspeed_zero3"), accelerator="cpu", zero_persistence_threshold=0)
    assert hw.precision == "bf16-mixed"
    tokenizer = build_byte_tokenizer()
    arch = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml").arch)
    policy = build_model(ModelArgs(arch=arch, dtype="bfloat16"), tokenizer, "cpu")
    generator = torch.Generator().manual_seed(0)
    encoded = [EncodedExample(torch.randint(3, 250, (12,), generator=generator).tolist(),
                              [torch.randint(3, 250, (6,), generator=generator).tolist() for _ in range(2)])
               for _ in range(4)]
    loader = make_loader(RankingDataset(encoded, [torch.tensor([-40.0, -41.0])] * 4), 2, tokenizer.pad_token_id,
                         shuffle=False)
    seen = {}

    class Dtypes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            engine = trainer.strategy.model
            seen.update(model=engine.get_data_types()[0], accumulate=engine.get_data_types()[1],
                        communicate=engine.communication_data_type,
                        optimizer=engine.optimizer.gradient_accumulation_dtype)

    fit(PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=1e-4)), loader, hw=hw, logger={}, out=tmp_path,
        stage="train", max_steps=1, max_epochs=1, enable_progress_bar=False, callbacks=[Dtypes()])
    assert seen == {"model": torch.bfloat16, "accumulate": torch.float32, "communicate": torch.float32,
                    "optimizer": torch.float32}
