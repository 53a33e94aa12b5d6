"""Generation: alignexp's engine beside transformers' ``generate`` on the same model, prompts and settings
(CPU), and the sampling share of a decode step on each side."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

MODELS = {
    # a 4-layer Llama with a 7B model's 32k vocabulary: the output head is most of a decode step
    "llama-32k": {"vocab_size": 32_000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4},
    # the tiny model of conf/model/tiny.yaml with the byte vocabulary (259 tokens)
    "tiny": {"vocab_size": 259, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4},
}
EOS, PAD = 2, 0


@dataclass(frozen=True)
class Setting:
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    note: str = ""


SETTINGS = (
    Setting("llama-32k"),
    Setting("tiny"),
    Setting("llama-32k", top_p=0.9, note="random weights spread the mass over most of the vocabulary, so the "
                                         "nucleus is longer than the engine's 256-token prefix: the engine finds "
                                         "the cut by bisection, generate sorts the vocabulary"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gen-batch", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--gen-new-tokens", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--gen-runs", type=int, default=5, help="timed runs per side and setting (after one warm-up)")
    parser.add_argument("--gen-threads", type=int, default=1, help="torch.set_num_threads for the generation rows")
    parser.add_argument("--real-gen-batch", type=int, default=32, help="prompts per call on the real model")
    parser.add_argument("--real-gen-new-tokens", type=int, default=32, help="new tokens per prompt on the real model")
    parser.add_argument("--real-gen-runs", type=int, default=3, help="timed runs per side on the real model (0: no generation rows there)")


def build(model_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[model_name], max_position_embeddings=512, bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=PAD, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of 16 to 64 random tokens (none of them special)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _times(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_setting(setting: Setting, args: argparse.Namespace, model=None, batch: list[list[int]] | None = None,
                eos: int = EOS, pad: int = PAD) -> dict:
    """Both sides alternated run by run; decode step = (time of N new tokens - time of 1) / (N - 1); sampling
    per step timed alone on the model's own next-token logits of the batch (median of N draws).

    ``model``, ``batch`` (prompts' token ids), ``eos``, ``pad``: a model of one's own (default: the setting's
    :data:`MODELS` entry, random prompts)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from alignexp.sampling.engine import SamplingParams, generate, sample_next, stream_keys, stream_uniforms

    model = build(setting.model) if model is None else model
    vocab = model.config.vocab_size
    batch = prompts(args.gen_batch, vocab) if batch is None else batch
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), pad)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        input_ids[i, width - len(p):], attention[i, width - len(p):] = torch.tensor(p), 1

    def engine(new: int):
        params = SamplingParams(temperature=setting.temperature, top_p=setting.top_p, max_new_tokens=new)
        return lambda: generate(model, batch, params, eos_id=eos, pad_id=pad, seeds=range(len(batch)),
                                batch_size=len(batch))

    def hf(new: int):
        config = GenerationConfig(do_sample=True, temperature=setting.temperature, top_k=0, top_p=setting.top_p,
                                  max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)

        def run():
            with torch.no_grad():
                return model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        return run

    new = args.gen_new_tokens
    sides = {"engine": (engine(new), engine(1)), "generate": (hf(new), hf(1))}
    times: dict[str, list[float]] = {name: [] for name in sides}
    first: dict[str, list[float]] = {name: [] for name in sides}
    for full, one in sides.values():  # warm-up
        full(), one()
    for run in range(args.gen_runs):
        for name in (list(sides) if run % 2 == 0 else list(sides)[::-1]):
            full, one = sides[name]
            times[name] += _times(full, 1)
            first[name] += _times(one, 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=1).logits[:, -1].float()
    params = SamplingParams(temperature=setting.temperature, top_p=setting.top_p)
    keys, workspace = stream_keys(range(len(batch))), (torch.empty_like(logits), torch.empty_like(logits))
    warpers = ([TemperatureLogitsWarper(setting.temperature)] if setting.temperature != 1 else []) + \
        ([TopPLogitsWarper(setting.top_p)] if setting.top_p < 1 else [])

    def hf_draw():
        scores = logits.clone()  # generate copies the last position's logits to fp32 each step
        for warper in warpers:
            scores = warper(input_ids, scores)
        torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)

    step = iter(range(10**9))
    sampling = {"engine": statistics.median(_times(
                    lambda: sample_next(logits, params, stream_uniforms(keys, next(step)), workspace), new)),
                "generate": statistics.median(_times(hf_draw, new))}
    out = {}
    for name in sides:
        total, one = statistics.median(times[name]), statistics.median(first[name])
        decode = (total - one) / (new - 1)
        out[name] = {"median_s": total, "times_s": times[name], "one_token_s": one, "decode_step_s": decode,
                     "sampling_s": sampling[name], "sampling_share": sampling[name] / decode}
    out["ratio"] = out["engine"]["median_s"] / out["generate"]["median_s"]
    return out


def generation_rows(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    threads = torch.get_num_threads()
    torch.set_num_threads(args.gen_threads)
    print(f"\n== Generation: alignexp's engine vs transformers {transformers.__version__} generate on the same model "
          f"and prompts (CPU fp32, {args.gen_threads} thread, {args.gen_batch} prompts of 16-64 tokens per call, "
          f"{args.gen_new_tokens} new tokens, no top-k, stop at EOS); median of {args.gen_runs} runs per side, "
          "alternated")
    print("decode step = (time for N new tokens - time for 1) / (N - 1); sampling = one step's draw from the "
          "model's own next-token logits, timed alone (engine: sample_next; generate: its warpers, softmax "
          "and multinomial)")
    out = {}
    try:
        for setting in SETTINGS:
            label = f"{setting.model} T={setting.temperature:g}" + (f" top-p {setting.top_p:g}"
                                                                    if setting.top_p < 1 else "")
            print(f"\n[{label}] {MODELS[setting.model]['num_hidden_layers']} layers, hidden "
                  f"{MODELS[setting.model]['hidden_size']}, vocabulary {MODELS[setting.model]['vocab_size']:,}"
                  + (f"; {setting.note}" if setting.note else ""), flush=True)
            result = run_setting(setting, args)
            for name in ("engine", "generate"):
                r = result[name]
                print(f"  {name:9s} {r['median_s']:7.3f} s per call; decode step {r['decode_step_s'] * 1000:7.2f} ms, "
                      f"of which sampling {r['sampling_s'] * 1000:6.2f} ms ({100 * r['sampling_share']:.1f}%)")
            share = result["engine"]["sampling_share"]
            verdict = ("met" if result["ratio"] <= 0.8 else "required met, wanted missed"
                       if result["ratio"] <= 1.0 else "MISSED")
            print(f"  ratio engine/generate: time {result['ratio']:.3f}  [target <= 1.0 required, <= 0.8 wanted: "
                  f"{verdict}; sampling <= 10% of a decode step: {'met' if share <= 0.1 else 'MISSED'}]")
            out[label] = result
    finally:
        torch.set_num_threads(threads)
    return out


def real_generation_rows(args: argparse.Namespace) -> dict:
    """Generation on the real model's folder (``--real-model``): ``--real-gen-batch`` prompts of English words
    (16-64 tokens with BOS, the real tokenizer), ``--real-gen-new-tokens`` new tokens, T = 1, no top-k or top-p,
    a stop at the tokenizer's EOS; ``--threads`` threads."""
    import random

    import torch
    import transformers

    from alignexp.args import ModelArgs
    from alignexp.bench.preference import WORDS
    from alignexp.models.backbone import build_model, build_tokenizer

    margs = ModelArgs(name="real", path=str(args.real_model), attn_implementation="sdpa", dtype="float32")
    tokenizer = build_tokenizer(margs)
    model = build_model(margs, tokenizer, "cpu").eval()
    rng = random.Random(0)
    batch = []
    for _ in range(args.real_gen_batch):
        n = rng.randint(16, 64)
        ids = [tokenizer.bos_token_id] + tokenizer(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize(),
                                                   add_special_tokens=False)["input_ids"]
        batch.append(ids[:n])
    run_args = argparse.Namespace(gen_batch=len(batch), gen_new_tokens=args.real_gen_new_tokens,
                                  gen_runs=args.real_gen_runs)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"\n== Generation on the real model {args.real_model}: alignexp's engine vs transformers "
          f"{transformers.__version__} generate on the same model and prompts (CPU fp32, {args.threads} threads, "
          f"{len(batch)} prompts of 16-64 tokens of English words, {args.real_gen_new_tokens} new tokens, T = 1, "
          f"no top-k or top-p, stop at EOS id {tokenizer.eos_token_id}); median of {args.real_gen_runs} runs per "
          "side, alternated", flush=True)
    try:
        result = run_setting(Setting("real"), run_args, model, batch, tokenizer.eos_token_id,
                             tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    for name in ("engine", "generate"):
        r = result[name]
        print(f"  {name:9s} {r['median_s']:7.3f} s per call; decode step {r['decode_step_s'] * 1000:7.2f} ms, "
              f"of which sampling {r['sampling_s'] * 1000:6.2f} ms ({100 * r['sampling_share']:.1f}%)")
    verdict = "met" if result["ratio"] <= REAL_TARGET else "MISSED"
    print(f"  ratio engine/generate: time {result['ratio']:.3f}  [target <= {REAL_TARGET}: {verdict}]")
    return {"model": str(args.real_model), "threads": args.threads, **result}


REAL_TARGET = 0.6
