"""The GPU check's correctness parts (``python -m alignexp.gpu_check``, :mod:`alignexp.gpu_check`):

* :func:`packed_parity`: the packed log-prob forward (:func:`alignexp.models.logprobs.sequence_logps`,
  shared-prefix packing, block mask) against a plain Hugging Face forward of each prompt + response
  alone, on a 2-layer Mistral-architecture model whose sliding window is shorter than the sequences, in
  fp32 (pass/fail against a tolerance) and in bf16 (reported).
* :func:`zero3_pipeline`: a 2-layer Mistral-architecture model (sliding window) trained a few steps
  through ``alignexp.pipeline.fit`` under ``conf/hardware/deepspeed_zero3.yaml`` on one GPU, then what a
  run does after the fit: the policy back whole (equal to DeepSpeed's own gather), saved, reloaded
  with ``from_pretrained`` (logits parity), and generation; and, where Hydra imports, the default
  experiment end to end with ``python -m alignexp.train hardware=deepspeed_zero3``.

Each returns a record with ``ok``; the GPU check exits 1 when one is not ok.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import alignexp

PARITY_TOLERANCE = 2e-3
"""Largest |packed - plain| summed log-prob (nats per response) accepted in fp32."""
LOGITS_TOLERANCE = 1e-2
"""Largest |saved and reloaded - trained| logit accepted in bf16 (the same bf16 weights, other kernels)."""


CONF = Path(alignexp.conf_dir())  # the config tree (alignexp.conf_dir imports no Hydra or OmegaConf)


def hardware_option(name: str):
    """``conf/hardware/<name>.yaml`` on one device, with the options it inherits (its ``defaults``), read
    without Hydra."""
    import yaml

    from alignexp.args import HardwareArgs

    settings = yaml.safe_load((CONF / "hardware" / f"{name}.yaml").read_text())
    for base in [b for b in settings.pop("defaults", []) if b != "_self_"]:
        settings = {**hardware_option(base).__dict__, **settings}
    return HardwareArgs(**{**settings, "devices": 1, "num_nodes": 1})


def mistral_arch(base: dict[str, Any], layers: int = 2, window: int = 32, **dims: int) -> dict[str, Any]:
    """Mistral-7B's architecture (``conf/model/mistral7b.yaml``) with ``layers`` layers and a short window."""
    return {**base, "num_hidden_layers": layers, "sliding_window": window, **dims}


def parity_model_args(arch: dict[str, Any], dtype: str):
    """The parity model's settings: in fp32 SDPA, named (``auto`` is FlashAttention-2 wherever ``flash_attn``
    imports, and FlashAttention takes no fp32 inputs); in bf16 the attention a run picks (``auto``)."""
    from alignexp.models.backbone import ModelArgs

    return ModelArgs(arch=arch, dtype=dtype, attn_implementation="sdpa" if dtype == "float32" else "auto")


def checkout_pythonpath() -> str:
    """``PYTHONPATH`` for a child ``python -m alignexp...`` run in another folder: the folder that holds the
    imported ``alignexp`` first (a checkout run without installing), then the caller's."""
    root = str(Path(alignexp.__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + rest if rest else "")


@torch.no_grad()
def packed_parity(arch: dict[str, Any], device: str, prompt_len: int = 48, response_len: int = 24,
                  responses: int = 3, rows: int = 2) -> dict[str, Any]:
    """Max |packed - plain| over every response's summed log-prob, fp32 (checked) and bf16 (reported)."""
    from alignexp.models.backbone import build_model
    from alignexp.models.logprobs import EncodedExample, pack, sequence_logps
    from alignexp.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    generator = torch.Generator().manual_seed(0)
    examples = [EncodedExample(torch.randint(3, 250, (prompt_len + 5 * i,), generator=generator).tolist(),
                               [torch.randint(3, 250, (response_len - 3 * j,), generator=generator).tolist()
                                for j in range(responses)]) for i in range(rows)]
    out: dict[str, Any] = {"window": arch.get("sliding_window"), "sequence_len": prompt_len + response_len,
                           "tolerance": PARITY_TOLERANCE}
    for dtype in ("float32", "bfloat16"):
        args = parity_model_args(arch, dtype)
        out[f"attention_{dtype}"] = args.attn_implementation
        model = build_model(args, tokenizer, device.split(":")[0]).to(device).eval()
        packed = sequence_logps(model, pack(examples, pad_id=tokenizer.pad_token_id).to(device))[0].float().cpu()
        worst = 0.0
        for i, example in enumerate(examples):
            for j, response in enumerate(example.response_ids):
                ids = torch.tensor([example.prompt_ids + response], device=device)
                logps = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
                targets = ids[0, 1:]
                plain = logps.gather(-1, targets[:, None])[-len(response):].sum().cpu()
                worst = max(worst, abs(float(plain - packed[i, j])))
        out[f"max_abs_diff_{dtype}"] = worst
        del model
    out["ok"] = out["max_abs_diff_float32"] <= PARITY_TOLERANCE
    return out


def zero3_pipeline(arch: dict[str, Any], device: str, folder: Path, steps: int = 3) -> dict[str, Any]:
    """Fit, gather, save, reload and generate under ZeRO-3 on one GPU (see the module docstring)."""
    import lightning as L
    from transformers import AutoModelForCausalLM

    from alignexp.args import OptimArgs
    from alignexp.lightning_modules.datamodule import RankingDataset, make_loader
    from alignexp.lightning_modules.preference import PreferenceModule
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.logprobs import EncodedExample, pack
    from alignexp.models.tokenizer import build_byte_tokenizer
    from alignexp.pipeline.fit import fit, save_policy
    from alignexp.sampling.engine import SamplingParams, generate

    hw = hardware_option("deepspeed_zero3")
    if device == "cpu":  # the dry run: DeepSpeed's CPU accelerator over gloo, every parameter partitioned
        hw = dataclasses.replace(hw, accelerator="cpu", zero_persistence_threshold=0)
    tokenizer = build_byte_tokenizer()
    policy = build_model(ModelArgs(arch=arch, dtype="bfloat16"), tokenizer, hw.device_type).to(device)
    generator = torch.Generator().manual_seed(0)
    encoded = [EncodedExample(torch.randint(3, 250, (40,), generator=generator).tolist(),
                              [torch.randint(3, 250, (16,), generator=generator).tolist() for _ in range(2)])
               for _ in range(8 * steps)]
    loader = make_loader(RankingDataset(encoded, [torch.tensor([-90.0, -91.0])] * len(encoded)), 8,
                         tokenizer.pad_token_id, shuffle=True)
    module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=1e-4))

    class Gather(L.Callback):  # DeepSpeed's own gather of every parameter at once, for comparison
        state: dict[str, torch.Tensor] = {}

        def on_train_end(self, trainer, pl_module) -> None:
            import deepspeed

            params = dict(pl_module.policy.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values())):
                Gather.state = {k: p.data.detach().clone() for k, p in params.items()}

    fit(module, loader, hw=hw, logger={}, out=folder, stage="train", max_steps=steps, max_epochs=1,
        enable_progress_bar=False, callbacks=[Gather()])
    plain = module.policy
    whole = all(torch.equal(p.detach(), Gather.state[k].to(p.device, p.dtype)) for k, p in plain.named_parameters())
    save_policy(plain, tokenizer, folder / "policy")
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "policy", dtype=torch.bfloat16).to(device).eval()
    batch = pack(encoded[:4], pad_id=tokenizer.pad_token_id).to(device)
    with torch.no_grad():
        diff = float((reloaded(input_ids=batch.input_ids).logits.float()
                      - plain.eval()(input_ids=batch.input_ids).logits.float()).abs().max())
    generations = generate(plain, [[5] * (3 + i) for i in range(4)], SamplingParams(max_new_tokens=8),
                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    record = {"params": sum(p.numel() for p in plain.parameters()), "steps": steps,
              "plain_equals_deepspeed_gather": whole, "saved_bytes": sum(
                  f.stat().st_size for f in (folder / "policy").glob("*.safetensors")),
              "logits_max_abs_diff": diff, "logits_tolerance": LOGITS_TOLERANCE,
              "generated_tokens": sum(len(g.token_ids) for g in generations),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device != "cpu" else None}
    record["ok"] = bool(whole and record["saved_bytes"] > 0 and diff <= LOGITS_TOLERANCE
                        and record["generated_tokens"] > 0)
    return record


def zero3_cli(folder: Path, timeout: int = 480) -> dict[str, Any]:
    """``python -m alignexp.train`` on the default experiment (debug=fast) with a 2-layer Mistral-architecture
    model under ``hardware=deepspeed_zero3`` on one GPU; ``ok`` when it wrote its policy and eval.json."""
    try:
        import hydra  # noqa: F401
    except ImportError:
        return {"ok": True, "skipped": "hydra is not importable here"}
    command = [sys.executable, "-m", "alignexp.train", "debug=fast", "eval.progress=false", "model=mistral7b",
               "model.path=null", "model.arch.num_hidden_layers=2", "model.arch.sliding_window=16",
               "model.max_prompt_len=64", "model.max_response_len=24", "hardware=deepspeed_zero3",
               "hardware.devices=1", f"paths.cache_dir={folder / 'cache'}", f"hydra.run.dir={folder / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=folder,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONPATH": checkout_pythonpath()})
    run = folder / "run"
    record = {"returncode": result.returncode, "policy_saved": (run / "policy" / "config.json").exists(),
              "eval_json": (run / "eval.json").exists()}
    if record["eval_json"]:
        saved = json.loads((run / "eval.json").read_text())
        record.update(gold_reward=saved["policy"].get("gold_reward"), global_batch_size=saved.get("global_batch_size"))
    if result.returncode:
        record["stderr_tail"] = result.stderr[-2000:]
    record["ok"] = result.returncode == 0 and record["policy_saved"] and record["eval_json"]
    return record


def correctness_checks(base_arch: dict[str, Any], device: str, deepspeed: bool, window: int = 32) -> dict[str, Any]:
    """The packed parity always; the ZeRO-3 pipeline where DeepSpeed is there (on the CPU, the dry run, with
    DeepSpeed's CPU accelerator); the end-to-end ZeRO-3 run on a GPU only (skipped by name on the CPU, where
    tests/distributed/test_sharded.py runs the same experiment on 2 processes)."""
    checks: dict[str, Any] = {"packed_parity": packed_parity(mistral_arch(base_arch, window=window), device)}
    from alignexp.gpu_check.requirements import REQUIRED_ON_GPU, missing

    lacking = [name for name in missing("cuda") if name in REQUIRED_ON_GPU.values()]
    if device == "cpu" and lacking:  # on a GPU, gpu_check refuses to start without them
        checks["zero3"] = {"ok": True, "skipped": f"not importable here: {', '.join(lacking)}"}
        return checks
    if not deepspeed and device != "cpu":
        checks["zero3"] = {"ok": True, "skipped": "DeepSpeed is not importable"}
        return checks
    with tempfile.TemporaryDirectory() as tmp:
        checks["zero3"] = zero3_pipeline(mistral_arch(base_arch), device, Path(tmp))
        checks["zero3_cli"] = zero3_cli(Path(tmp)) if device != "cpu" else {
            "ok": True, "skipped": "the end-to-end run is GPU only (on the CPU: tests/distributed/test_sharded.py)"}
    return checks
