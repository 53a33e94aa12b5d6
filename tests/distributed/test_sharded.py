"""ZeRO-3 (DeepSpeed on its CPU accelerator) and FSDP2 (``fully_shard``) on 2 CPU ranks over gloo: the default
experiment end to end, and the partitioned save, gather and generation after the fit checked directly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.distributed.conftest import FAST, TWO_CPU_RANKS, check, only_file, train, weights


def _run_default_experiment(tmp_path, *overrides: str) -> dict:
    """The default experiment (debug=fast) on 2 CPU ranks; checks what every sharded run must leave: one
    policy folder with whole, trained weights, one eval.json with samples from the trained policy, one table."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = check(train(*FAST, *TWO_CPU_RANKS, *overrides, f"hydra.run.dir={out}", cache=cache))
    assert result.stdout.count("KL to reference") == 1
    record = json.loads((out / "eval.json").read_text())
    assert record["global_batch_size"] == 16 and record["n_prompts"] > 0
    assert all(example["policy"] for example in record["by_temperature"]["1"]["examples"])  # generation after fit
    saved, start = weights(out / "policy"), weights(only_file(cache / "sft", "config.json").parent)
    assert set(saved) == set(start) and all(saved[k].shape == start[k].shape and saved[k].numel() for k in saved)
    assert any(not torch.equal(saved[k], start[k]) for k in saved)  # the trained weights, not the SFT policy's
    return record


def test_zero3_runs_the_default_experiment_on_two_cpu_ranks(tmp_path):
    """``hardware=deepspeed_zero3 hardware.accelerator=cpu hardware.devices=2`` (every parameter partitioned:
    ``hardware.zero_persistence_threshold=0``)."""
    pytest.importorskip("deepspeed")
    _run_default_experiment(tmp_path, "hardware=deepspeed_zero3", "hardware.zero_persistence_threshold=0")


def test_fsdp2_runs_the_default_experiment_with_lora_on_two_cpu_ranks(tmp_path):
    """``hardware=fsdp`` with LoRA adapters (FSDP2 shards per parameter: frozen base and trainable adapters)."""
    _run_default_experiment(tmp_path, "hardware=fsdp", "model.lora={r: 4}")


@pytest.mark.slow
def test_fsdp2_runs_the_default_experiment_on_two_cpu_ranks(tmp_path):
    _run_default_experiment(tmp_path, "hardware=fsdp")


@pytest.mark.parametrize("kind, lora", [
    pytest.param("zero3", False, marks=pytest.mark.slow),
    pytest.param("zero3", True, marks=pytest.mark.slow),
    pytest.param("fsdp", False, marks=pytest.mark.slow),
    pytest.param("fsdp", True, marks=pytest.mark.slow),
])
def test_sharded_fit_leaves_whole_weights_that_save_reload_and_generate(tmp_path, kind, lora):
    """tests/distributed/gather_check.py on 2 ranks: sharded while training; afterwards a plain policy whose
    weights equal an independent gather; the saved folder non-empty, equal to them (LoRA merged), reloading
    to the same logits; generation on each rank with its own lengths, and both ranks finish."""
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    command = [sys.executable, "-m", "tests.distributed.gather_check", kind, str(tmp_path)] + (["lora"] if lora else [])
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["sharded_while_training"] and record["plain_after_fit"] and record["plain_equals_gathered"]
    assert record["saved_tensors"] == 21 and record["saved_elements"] > 100_000 and record["saved_equals_merged"]
    assert record["logits_max_abs_diff"] < 1e-5 and record["trained"]
    assert record["generated_tokens_per_rank"][0] > 0 and record["generated_tokens_per_rank"][1] > 0
