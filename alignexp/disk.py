"""Room on disk for what a run will write, checked before the work (a run that trains for hours and then
cannot save its policy loses it).

:func:`planned_writes` estimates each thing a training run writes and where: the trained policy (its
parameters at ``model.dtype``) in the run folder, Lightning's checkpoints there when
``train.checkpoint_every`` is set (weights, fp32 master copy and Adam's two moments), PPO's last checkpoint
(the policy, and the critic where there is one, each with AdamW's two fp32 moments), the task's SFT
policy in the cache when it is not cached yet, and a margin for the tokenizer, logs, caches of samples and
log-probs and eval files. :func:`check_free_space` adds them up per file system and refuses the run,
naming the folder, its free space and the need, where they do not fit. :func:`free_bytes` is the one probe
of the file system (the tests patch it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from alignexp.errors import ConfigError

MiB = 1 << 20
MARGIN = 64 * MiB  # tokenizer, configs, logs, eval.json and eval_prompts.jsonl, samples and log-prob caches
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    folder = Path(path).expanduser().resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _device(path: Path) -> int:
    folder = Path(path).expanduser().resolve()
    return next(p for p in (folder, *folder.parents) if p.exists()).stat().st_dev


def model_bytes(model: Any) -> int | None:
    """The bytes of ``model``'s parameters at its ``dtype``: a local folder's weight files rescaled from the
    dtype they are stored in; else the parameter count of its ``arch``. None where neither is known (a hub id
    whose preset gives no architecture)."""
    target = DTYPE_BYTES.get(str(model.dtype), 4)
    path = Path(str(model.path)).expanduser() if model.path else None
    if path is not None and path.is_dir():
        stored_bytes = sum(f.stat().st_size for pattern in WEIGHT_FILES for f in path.glob(pattern))
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        stored = config.get("torch_dtype") or config.get("dtype")
        return int(stored_bytes * target / DTYPE_BYTES.get(str(stored), target)) if stored_bytes else None
    return arch_bytes(model.arch, target)


def arch_bytes(arch: dict[str, Any], dtype_bytes: int) -> int | None:
    """The parameters of a Llama/Mistral-type ``arch`` (the presets' and the tiny model's) times
    ``dtype_bytes``, in closed form (:func:`alignexp.scale.plan_memory.llama_counts`: nothing imported or built);
    None for another architecture or one the mapping does not spell out."""
    from alignexp.scale.plan_memory import ANALYTIC_TYPES, llama_counts

    try:
        if arch.get("model_type", "llama") not in ANALYTIC_TYPES:
            return None
        h, heads = int(arch["hidden_size"]), int(arch["num_attention_heads"])
        total = llama_counts(h, int(arch["intermediate_size"]), heads, int(arch.get("num_key_value_heads") or heads),
                             int(arch.get("head_dim") or h // heads), int(arch.get("vocab_size", 512)),
                             int(arch["num_hidden_layers"]), bool(arch.get("tie_word_embeddings", False)),
                             bool(arch.get("attention_bias", False)), bool(arch.get("mlp_bias", False)))[0]
    except (KeyError, TypeError, ValueError):
        return None
    return total * dtype_bytes


def planned_writes(args: Any, task: Any) -> list[tuple[Path, str, int]]:
    """(folder, what, bytes) for each thing the run will write, as estimated in the module docstring."""
    from alignexp.pipeline.weights import sft_policy_folder

    size = model_bytes(args.model)
    if size is None and args.init_from:
        size = model_bytes(type(args.model)(**{**args.model.__dict__, "path": args.init_from}))
    writes: list[tuple[Path, str, int]] = [(args.output_dir, "run files (logs, eval, tokenizer)", MARGIN)]
    if size is None:
        return writes
    writes.append((args.output_dir, "the trained policy", size))
    params = size // DTYPE_BYTES.get(str(args.model.dtype), 4)
    if args.train.checkpoint_every:
        writes.append((args.output_dir, "training checkpoints", size + params * 12))  # + fp32 master, Adam m and v
    if args.loss.name == "ppo":  # its last checkpoint, always written: each trained model with AdamW's 2 moments
        models = 2 if args.ppo.value_model == "critic" else 1
        writes.append((args.output_dir, "the PPO checkpoint", models * (size + params * 8)))
    if not args.init_from and not args.model.path and task.trains_sft_policy:
        folder = sft_policy_folder(args, task)
        if not (folder / "config.json").exists():
            writes.append((args.cache_dir, "the task's SFT policy (cache)", size))
    return writes


def check_free_space(args: Any, task: Any) -> None:
    """Refuse the run where a file system cannot hold what the run will write there (module docstring)."""
    by_device: dict[int, list[tuple[Path, str, int]]] = {}
    for folder, what, need in planned_writes(args, task):
        by_device.setdefault(_device(folder), []).append((folder, what, need))
    for writes in by_device.values():
        need = sum(n for _, _, n in writes)
        free = free_bytes(writes[0][0])
        if need > free:
            folders = sorted({str(f) for f, _, _ in writes})
            parts = ", ".join(f"{what} {n / MiB:.0f} MiB" for _, what, n in writes)
            key = "paths.output_dir" if str(args.output_dir) in folders else "paths.cache_dir"
            raise ConfigError(f"{key}: the run will write about {need / MiB:.0f} MiB in {' and '.join(folders)} "
                              f"({parts}), but that file system has {free / MiB:.1f} MiB free; free some space "
                              f"or choose another {key}")
