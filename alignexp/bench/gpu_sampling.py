"""``python -m alignexp.bench.gpu_sampling``: sampled tokens/s of vLLM beside alignexp's HF engine on one GPU.

The model has Mistral-7B's layer dimensions (``conf/model/mistral7b.yaml``), random weights, ``--layers``
decoder layers, bf16; both backends get the same prompts (random token ids), seeds and settings, and vLLM
starts from the model saved in HF format, then receives its weights in memory (``sync_weights``, timed).
Prints one JSON line; where vLLM does not import, its fields say so. ``scripts/gpu_speed.sh`` runs it;
``--device cpu --size tiny`` runs the same code in seconds (a test does, with a stand-in for vLLM).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[2] / "conf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m alignexp.bench.gpu_sampling", description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("7b", "tiny"), default="7b",
                        help="7b: Mistral-7B's layer dimensions; tiny: a small model of the same structure")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (Mistral-7B has 32)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64, help="the HF engine's batch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    return parser.parse_args(argv)


def _timed(fn) -> tuple[object, float]:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    import yaml

    from alignexp.gpu_check.check import TINY_DIMS
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.tokenizer import build_byte_tokenizer
    from alignexp.sampling.engine import SamplingParams
    from alignexp.sampling.vllm_backend import HFBackend, VLLMBackend, choose_backend

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (or try --device cpu --size tiny)")
    arch = {**yaml.safe_load((CONF / "model" / "mistral7b.yaml").read_text())["arch"], "num_hidden_layers": args.layers}
    if args.size == "tiny":
        arch.update(TINY_DIMS)
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    model_args = ModelArgs(name="mistral7b-arch", arch=arch, dtype="bfloat16" if cuda else "float32")
    model = build_model(model_args, tokenizer, args.device).to(args.device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(300, arch["vocab_size"], (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    seeds = list(range(args.prompts))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new_tokens)
    eos = tokenizer.eos_token_id
    record: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "layers": args.layers,
                    "params": sum(p.numel() for p in model.parameters()), "prompts": args.prompts,
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "temperature": args.temperature,
                    "top_p": args.top_p, "torch": torch.__version__}

    hf = HFBackend(model, tokenizer.pad_token_id, batch_size=args.batch)
    hf.generate(prompts[:args.batch], SamplingParams(max_new_tokens=4), eos_id=eos, seeds=seeds[:args.batch])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    generations, seconds = _timed(lambda: hf.generate(prompts, params, eos_id=eos, seeds=seeds))
    tokens = sum(len(x.token_ids) for x in generations)
    record["hf"] = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                    "batch": args.batch}
    if cuda:
        record["hf"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    try:
        choice = choose_backend("vllm")
    except RuntimeError as error:
        record["vllm"] = {"skipped": str(error)}
        return record
    with tempfile.TemporaryDirectory(prefix="alignexp-gpu-sampling-") as folder:
        model.save_pretrained(folder)
        vllm, start_s = _timed(lambda: VLLMBackend(folder, dtype=model_args.dtype, colocate=False,
                                                   gpu_memory_utilization=args.gpu_memory_utilization,
                                                   skip_tokenizer_init=True))
        _, sync_s = _timed(lambda: vllm.sync_weights(model))
        vllm.generate(prompts[:8], SamplingParams(max_new_tokens=4), eos_id=eos, seeds=seeds[:8])
        generations, seconds = _timed(lambda: vllm.generate(prompts, params, eos_id=eos, seeds=seeds))
    tokens = sum(len(x.token_ids) for x in generations)
    record["vllm"] = {"version": vllm.version, "reason": choice.reason, "tokens": tokens, "seconds": round(seconds, 3),
                      "tokens_per_s": round(tokens / seconds, 1), "start_s": round(start_s, 1),
                      "sync_weights_s": round(sync_s, 2)}
    record["vllm_over_hf_tokens_per_s"] = round(record["vllm"]["tokens_per_s"] / record["hf"]["tokens_per_s"], 2)
    return record


def main(argv: list[str] | None = None) -> None:
    from alignexp.gpu_check.check import print_record

    args = parse_args(argv)
    print_record(run(args), args.out)


if __name__ == "__main__":
    main()
