"""``python -m alignexp.gpu_check``: a few preference-training steps of a 7B-architecture model on one GPU.

``make gpu-check`` (``scripts/gpu_check.sh``) runs it. The model is randomly initialised with
Mistral-7B's dimensions (``conf/model/mistral7b.yaml``: hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocabulary 32000) and fewer decoder layers (``--layers``, 8 by default: about 2.0B parameters),
so that full fine-tuning fits one GPU. It trains with the real pieces: shared-prefix packed batches
(:mod:`alignexp.models.logprobs`), a registered loss, :class:`~alignexp.lightning_modules.preference.PreferenceModule`
and the strategy that :mod:`alignexp.scale.hardware` builds from ``conf/hardware/deepspeed_zero3.yaml`` (when
DeepSpeed imports) or ``conf/hardware/gpu.yaml``, in bf16, with the attention that
:func:`alignexp.models.backbone.build_model` picks (FlashAttention-2 if it imports, else SDPA).
Reference log-probs come with each batch, as the precomputed cache gives them.

It prints one JSON line: ``tokens_per_s`` (packed tokens, the prompt once per row), ``mfu`` (model
FLOPs utilisation: 6 x parameters x tokens per second, with the output head counted on response
tokens only, plus attention's score and value products over the pairs the block mask leaves
(:func:`attention_flops`), over the GPU's peak dense bf16 FLOP/s, e.g. 989 TFLOP/s for an H100 SXM;
Chowdhery et al. 2022, "PaLM", appendix B), ``peak_memory_gib`` (``torch.cuda.max_memory_allocated``)
next to ``plan_estimate_gib`` (:mod:`alignexp.plan`'s estimate for the same run),
``packing_max_abs_diff``: the largest difference between a response's log-prob computed packed
with its siblings and computed alone (the block mask at work under the chosen attention kernel), and
``checks`` (:mod:`alignexp.gpu_check.zero3`): the packed log-prob forward against a plain Hugging Face
forward, and a 2-layer Mistral-architecture model through ZeRO-3 (fit, gather, save, reload, logits,
generation, and the default experiment end to end). It exits 1 when a check fails.

It imports no Hydra, OmegaConf or datasets (GPU machines may lack them) and DeepSpeed only when it is
importable. ``--device cpu --size tiny`` runs the same code in seconds (a test does).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

import alignexp

CONF = Path(alignexp.conf_dir())  # the config tree (alignexp.conf_dir imports no Hydra or OmegaConf)

# Peak dense bf16 tensor-core FLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("B200", 2250e12),
)

# --size tiny: the same structure (GQA with 4 query heads per KV head, gated MLP) at a CPU-friendly size.
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 224, "num_attention_heads": 4, "num_key_value_heads": 1,
             "vocab_size": 512}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def peak_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device, from its name; None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alignexp.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("7b", "tiny"), default="7b",
                        help="7b: Mistral-7B's layer dimensions; tiny: a small model of the same structure")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (Mistral-7B has 32)")
    parser.add_argument("--strategy", choices=("auto", "deepspeed_zero3", "gpu", "cpu"), default="auto",
                        help="a conf/hardware option; auto: deepspeed_zero3 when DeepSpeed imports, else gpu")
    parser.add_argument("--batch", type=int, default=4, help="packed rows (prompts) per step")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt (ranked_dpo; 2: dpo)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--layout", choices=("padding-free", "padded"), default="padding-free",
                        help="the log-prob forward: one padding-free row (default) or the padded rows")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s")
    parser.add_argument("--parity-window", type=int, default=32,
                        help="sliding window of the packed-parity model (shorter than its 72-token sequences)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args(argv)
    for name in ("layers", "batch", "prompt_len", "response_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.responses < 2:
        parser.error("--responses must be >= 2")
    return args


def _hardware(args: argparse.Namespace):
    from alignexp.gpu_check.zero3 import hardware_option

    name = args.strategy
    if name == "auto":
        name = "cpu" if args.device == "cpu" else ("deepspeed_zero3" if _importable("deepspeed") else "gpu")
    if (args.device == "cpu") != (name == "cpu"):
        raise SystemExit(f"--strategy {name} does not run on --device {args.device}")
    return hardware_option(name)


def _model_args(args: argparse.Namespace):
    from alignexp.models.backbone import ModelArgs

    mistral = _read_yaml(CONF / "model" / "mistral7b.yaml")
    arch = {**mistral["arch"], "num_hidden_layers": args.layers}
    if args.size == "tiny":
        arch.update(TINY_DIMS)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    return ModelArgs(name=f"mistral7b-arch-{args.size}-{args.layers}layers", path=None, arch=arch, dtype=dtype,
                     attn_implementation="auto", gradient_checkpointing=args.checkpointing,
                     max_prompt_len=args.prompt_len, max_response_len=args.response_len)


def _batches(args: argparse.Namespace, vocab: int, pad_id: int, count: int, seed: int = 0) -> list:
    """``count`` packed batches of random tokens, each row a prompt and its responses, with reference
    log-probs attached as the precomputed cache attaches them."""
    from alignexp.models.logprobs import EncodedExample, pack

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        examples = [EncodedExample(torch.randint(0, vocab, (args.prompt_len,), generator=generator).tolist(),
                                   [torch.randint(0, vocab, (args.response_len,), generator=generator).tolist()
                                    for _ in range(args.responses)]) for _ in range(args.batch)]
        batch = pack(examples, pad_id=pad_id)
        if args.layout == "padded":
            batch.flat = None  # response_states then runs the padded rows under a dense block mask
        batch.ref_logps = -args.response_len * math.log(vocab) + torch.randn(batch.lengths.shape, generator=generator)
        out.append(batch)
    return out


def attention_flops(args: argparse.Namespace, arch: dict[str, Any]) -> float:
    """Training FLOPs of attention's score and value products in one step: 12 x layers x (heads x head dim)
    per (query, visible key) pair (QK^T and AV, 2 FLOPs per multiply-add each, x3 for forward and backward;
    Chowdhery et al. 2022, appendix B), with the pairs the block mask leaves: the prompt causally, and each
    response over the prompt and itself causally (P(P+1)/2 + n (R P + R(R+1)/2) per row)."""
    p, r, n = args.prompt_len, args.response_len, args.responses
    width = arch["num_attention_heads"] * arch.get("head_dim", arch["hidden_size"] // arch["num_attention_heads"])
    pairs = p * (p + 1) / 2 + n * (r * p + r * (r + 1) / 2)
    return 12.0 * arch["num_hidden_layers"] * width * pairs * args.batch


@torch.no_grad()
def packing_difference(model, batch) -> float:
    """Max |log p(response | prompt)| difference between the packed row and each response packed alone."""
    from alignexp.models.logprobs import EncodedExample, pack, sequence_logps

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        packed = sequence_logps(model, batch.to(device))[0][0].float()
        ids = batch.input_ids[0].tolist()
        lengths = batch.lengths[0].tolist()
        prompt_len = len(ids) - sum(lengths)
        start, alone = prompt_len, []
        for length in lengths:
            single = pack([EncodedExample(ids[:prompt_len], [ids[start:start + length]])], pad_id=0).to(device)
            alone.append(sequence_logps(model, single)[0][0, 0].float())
            start += length
    finally:
        model.train(was_training)
    return float((packed - torch.stack(alone)).abs().max())


class StepTimer:
    """A Lightning callback: wall time of each training step, the device synchronised at both ends."""

    def __init__(self, device: str):
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, check packing, train ``warmup + steps`` steps, and return the JSON record."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from alignexp.gpu_check.zero3 import correctness_checks
    from alignexp.lightning_modules.preference import OptimArgs, PreferenceModule
    from alignexp.models.backbone import build_model
    from alignexp.models.logprobs import padding_free_supported
    from alignexp.models.lora import LoraArgs, apply_lora
    from alignexp.models.tokenizer import build_byte_tokenizer
    from alignexp.scale.hardware import trainer_kwargs
    from alignexp.scale.plan import PlanInputs, plan_memory

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or try --device cpu --size tiny)")
    hw = _hardware(args)
    model_args = _model_args(args)
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    build_start = time.perf_counter()
    model = build_model(model_args, tokenizer, hw.device_type)
    lora = LoraArgs(r=args.lora_r, dropout=0.0) if args.lora_r else None
    if lora is not None:
        model = apply_lora(model, lora)
    build_s = time.perf_counter() - build_start
    n_params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    head_params = model.get_output_embeddings().weight.numel()
    vocab = model_args.arch["vocab_size"]
    batches = _batches(args, vocab, tokenizer.pad_token_id, args.warmup + args.steps)

    model.to(args.device)
    packing_diff = packing_difference(model, batches[0])
    loss_name = "ranked_dpo" if args.responses > 2 else "dpo"
    module = PreferenceModule(model, loss_name, {"beta": 0.1}, OptimArgs(lr=1e-5, warmup_steps=0))
    timer = StepTimer(args.device)
    callback = type("StepTimerCallback", (Callback,), {
        "on_train_batch_start": lambda self, *a: timer.on_train_batch_start(*a),
        "on_train_batch_end": lambda self, *a: timer.on_train_batch_end(*a)})()
    # batch_size=1 over ready-made batches: DeepSpeed's strategy reads the loader's batch size for its logs.
    loader = torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda items: items[0])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(**trainer_kwargs(hw), max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[callback], default_root_dir="/tmp/alignexp-gpu-check")
    fit_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - fit_start

    timed = timer.times[args.warmup:] or timer.times
    step_s = sum(timed) / len(timed)
    tokens = args.batch * (args.prompt_len + args.responses * args.response_len)
    response_tokens = args.batch * args.responses * args.response_len
    flops = 6 * (layer_params * tokens + head_params * response_tokens) + attention_flops(args, model_args.arch)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(device_name) if args.device == "cuda" else None)
    if args.device == "cuda":
        peak_memory = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (Linux reports KiB)
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    estimate = plan_memory(PlanInputs(
        model_name=model_args.name, arch=model_args.arch, model_dtype=model_args.dtype,
        gradient_checkpointing=args.checkpointing, lora=lora, hardware=hw, gpus=1, gpu_memory_gib=None,
        rows=args.batch, n_responses=args.responses, prompt_len=args.prompt_len, response_len=args.response_len,
        reference="precompute", overhead_gib=0.0))
    from alignexp.models.backbone import attention_implementation

    return {
        "device": device_name, "strategy": hw.name, "precision": hw.precision,
        "attention": attention_implementation(model_args.attn_implementation, hw.device_type),
        "layers": args.layers, "size": args.size, "params": n_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_r": args.lora_r, "gradient_checkpointing": args.checkpointing, "loss": loss_name,
        "layout": args.layout if padding_free_supported(model.get_decoder()) else "padded (model not supported)",
        "batch_rows": args.batch, "tokens_per_step": tokens, "response_tokens_per_step": response_tokens,
        "steps_timed": len(timed), "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 2),
        "peak_bf16_tflops": peak / 1e12 if peak else None, "mfu": round(flops / step_s / peak, 4) if peak else None,
        "peak_memory_gib": round(peak_memory, 3), "peak_memory_kind": "cuda_max_allocated" if args.device == "cuda"
        else "process_max_rss", "plan_estimate_gib": round(estimate.total / 2**30, 3),
        "packing_max_abs_diff": round(packing_diff, 5), "final_loss": float(trainer.callback_metrics.get(
            "train/loss_step", trainer.callback_metrics.get("train/loss", float("nan")))),
        "build_s": round(build_s, 1), "fit_s": round(fit_s, 1), "torch": torch.__version__,
        "attention_flops_share": round(attention_flops(args, model_args.arch) / flops, 4),
        "checks": correctness_checks(model_args.arch, args.device, hw.strategy == "deepspeed", args.parity_window),
    }


def print_record(record: dict[str, Any], out: Path | None) -> None:
    """The record as one JSON line on stdout, and in ``out`` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(line + "\n")


def main(argv: list[str] | None = None) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    logger = logging.getLogger("alignexp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    from alignexp.gpu_check.requirements import missing

    lacking = missing(args.device)
    if lacking:  # every one at once, before anything is built
        print(f"[gpu_check] missing: {', '.join(lacking)}. Install them with `bash scripts/gpu_setup.sh` (make "
              f"gpu-setup), or carry wheels: docs/scale.md, 'On a GPU machine without our packages'",
              file=sys.stderr, flush=True)
        sys.exit(2)
    record = run(args)
    record["ok"] = all(check["ok"] for check in record["checks"].values())
    print_record(record, args.out)
    if not record["ok"]:
        failed = [name for name, check in record["checks"].items() if not check["ok"]]
        print(f"[gpu_check] FAILED: {', '.join(failed)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
