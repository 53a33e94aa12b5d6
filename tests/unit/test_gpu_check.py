"""The GPU check and the scripts around it, on the CPU: what a fresh GPU machine lacks is named at once, the
setup fetches wheels for any Python, the parity model never asks FlashAttention for fp32, the ZeRO-3 child
finds the checkout, and the speed script measures everything even when one part fails. The dry run of the
check itself: tests/unit/test_hardware.py::test_gpu_check_runs_on_cpu_without_hydra_omegaconf_datasets_or_deepspeed
(in ``make test``) and :func:`test_gpu_check_dry_run_with_deepspeed_on_the_cpu` (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _blocker(tmp_path: Path, *modules: str) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        for name in {list(modules)!r}:
            sys.modules[name] = None  # any import of them raises ImportError
    """))
    return folder


def test_every_missing_dependency_is_named_at_once_before_anything_runs(tmp_path):
    """A GPU machine with torch alone: one message lists them all, exit 2, nothing built or trained."""
    blocked = ("yaml", "lightning", "transformers", "peft", "deepspeed", "omegaconf")
    env = {**os.environ, "PYTHONPATH": f"{_blocker(tmp_path, *blocked)}:{REPO}"}
    result = subprocess.run([sys.executable, "-m", "alignexp.gpu_check", "--device", "cuda"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "missing: PyYAML, lightning, transformers, peft, deepspeed, omegaconf." in result.stderr
    assert "scripts/gpu_setup.sh" in result.stderr and result.stdout == ""
    assert "attention" not in result.stderr  # no model was built


def test_missing_is_empty_where_everything_imports():
    from alignexp.gpu_check.requirements import missing

    assert missing("cpu") == [] and missing("cuda") == []


def test_the_wheel_list_brings_the_check_without_torch():
    """The requirements that ``gpu_setup.sh download`` fetches: every package the check imports, with their
    own dependencies, pinned to this environment, and nothing of torch (the GPU machine has its own)."""
    from alignexp.gpu_check.requirements import requirements

    names = {line.split("==")[0] for line in requirements()}
    assert all("==" in line for line in requirements())
    assert {"pyyaml", "lightning", "transformers", "peft", "tokenizers", "safetensors", "deepspeed", "hjson",
            "pydantic", "hydra-core", "omegaconf", "antlr4-python3-runtime", "huggingface-hub"} <= names
    assert not names & {"torch", "triton", "sympy", "networkx"} and not any(n.startswith("nvidia") for n in names)


@pytest.mark.parametrize("python_version", ["3.10", "3.12", "3.13"])
def test_gpu_setup_downloads_wheels_for_the_machines_python(tmp_path, python_version):
    env = {**os.environ, "GPU_SETUP_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp_path / "w")}
    result = subprocess.run(["bash", "scripts/gpu_setup.sh", "download", python_version], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    download, wheel = result.stdout.strip().splitlines()
    assert f"--python-version {python_version}" in download and "--only-binary=:all:" in download
    assert " transformers==" in download and " deepspeed==" not in download and " torch==" not in download
    assert "pip wheel --no-deps" in wheel and " deepspeed==" in wheel and " antlr4-python3-runtime==" in wheel


def test_gpu_setup_installs_carried_wheels_without_the_index(tmp_path):
    wheels = tmp_path / "w"
    wheels.mkdir()
    (wheels / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"")
    env = {**os.environ, "GPU_SETUP_DRY_RUN": "1", "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(wheels)}
    result = subprocess.run(["bash", "scripts/gpu_setup.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--no-index" in result.stdout and "--target /tmp/site" in result.stdout and "hjson-3.1.0" in result.stdout


def test_the_parity_model_asks_for_sdpa_in_fp32_even_where_flash_attention_imports(monkeypatch):
    """FlashAttention refuses fp32: with ``flash_attn`` importable on CUDA, ``auto`` would pick it."""
    import importlib.util

    from alignexp.gpu_check.zero3 import parity_model_args
    from alignexp.models.backbone import attention_implementation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert attention_implementation("auto", "cuda") == "flash_attention_2"
    assert attention_implementation(parity_model_args({}, "float32").attn_implementation, "cuda") == "sdpa"
    assert parity_model_args({}, "bfloat16").attn_implementation == "auto"  # bf16: what a run picks


def test_the_zero3_child_imports_this_checkout_from_another_folder(tmp_path):
    """The end-to-end ZeRO-3 check starts ``python -m alignexp.train`` in a temporary folder: it must import
    the alignexp the check runs (a checkout run without installing), not fail or take another copy."""
    from alignexp.gpu_check.zero3 import checkout_pythonpath

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import alignexp, sys; print(alignexp.__file__)"
    child = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           env={**env, "PYTHONPATH": checkout_pythonpath()})
    assert Path(child.stdout.strip()).resolve() == (REPO / "alignexp" / "__init__.py").resolve(), child.stderr
    bare = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bare.returncode != 0  # without it (no site-packages here, as on a machine without an install)


def test_gpu_speed_measures_everything_when_one_part_fails(tmp_path):
    """A failed check (exit 1) stops neither the other layout nor the sampling benchmark; the script fails at
    the end naming it."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n[[ "$*" == *padded* ]] && exit 0\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", "scripts/gpu_speed.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    lines = calls.read_text().splitlines()
    assert len(lines) == 3 and "padding-free" in lines[0] and "padded" in lines[1] and "gpu_sampling" in lines[2]
    assert result.returncode == 1 and "FAILED: step-padding-free sampling" in result.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_with_deepspeed_on_the_cpu(tmp_path):
    """The check's CUDA steps replaced by their CPU equivalents: the ZeRO-3 pipeline (fit, gather, save, reload,
    generation) under DeepSpeed's CPU accelerator, without Hydra (as on a GPU machine set up with
    ``gpu_setup.sh``: OmegaConf is there, Hydra need not be); the end-to-end run skipped by name."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(_blocker(tmp_path, "hydra", "datasets")),
           "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp_path)}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", "--size", "tiny", "--layers", "1", "--steps", "1",
         "--warmup", "1", "--batch", "2", "--prompt-len", "12", "--response-len", "6", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    zero3 = record["checks"]["zero3"]
    assert zero3["ok"] and zero3["plain_equals_deepspeed_gather"] and zero3["generated_tokens"] > 0
    assert zero3["logits_max_abs_diff"] <= zero3["logits_tolerance"]
    assert "GPU only" in record["checks"]["zero3_cli"]["skipped"]
    assert record["checks"]["packed_parity"]["attention_float32"] == "sdpa"
