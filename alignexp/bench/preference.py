"""The preference step beside TRL's DPOTrainer, and alignexp's own step at a 32k vocabulary with the output
head chunked or not (``python -m alignexp.bench``; what is measured: ``alignexp/bench/__init__.py``)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from alignexp.bench.probes import rss_step_delta_mb, tensor_peak_mb

LR = 1e-5
BETA = 0.1
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


@dataclass(frozen=True)
class Shape:
    """A benchmark workload: ``prompts`` per batch, each with ``n`` ranked responses."""

    name: str
    prompts: int
    n: int
    prompt_len: tuple[int, int]
    response_len: tuple[int, int]
    max_total: int | None
    alignexp_loss: str
    target: float
    description: str


SHAPES = {
    "dpo": Shape("dpo", 8, 2, (16, 64), (8, 112), 128, "dpo", 0.6,
                 "DPO-shaped: 8 pairs/batch, prompt 16-64 tokens, prompt + response <= 128"),
    "tldr": Shape("tldr", 8, 4, (256, 512), (32, 64), None, "ranked_dpo", 0.3,
                  "TL;DR-shaped: 8 prompts/batch, rankings of 4, prompts 256-512 tokens, responses 32-64"),
}


def make_texts(shape: Shape, n_batches: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n_batches * shape.prompts`` (prompt, responses best first) texts; one byte is one token.

    Lengths count the tokens the byte tokenizer gives: the prompt includes BOS and each response its EOS.
    """
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(tokens))

    rows = []
    for _ in range(n_batches * shape.prompts):
        p = rng.randint(*shape.prompt_len)
        top = shape.response_len[1] if shape.max_total is None else min(shape.response_len[1], shape.max_total - p)
        rows.append((text(p - 1), [text(rng.randint(shape.response_len[0], top) - 1) for _ in range(shape.n)]))
    return rows


# --------------------------------------------------------------------------- the two sides


class AlignexpSide:
    """alignexp's step: Collator -> PreferenceModule.compute_loss -> backward -> AdamW."""

    def __init__(self, shape: Shape, texts: list[tuple[str, list[str]]], vocab: int | None = None):
        import torch

        from alignexp.models import logprobs
        from alignexp.models.logprobs import encode_example
        from alignexp.models.reference import response_logps
        from alignexp.modules.datamodule import Collator
        from alignexp.modules.preference import OptimArgs, PreferenceModule
        from alignexp.tasks.base import RankedExample

        model, tokenizer = build_tiny(vocab)
        self.encoded = [encode_example(tokenizer, RankedExample(p, rs), 10**6, 10**6) for p, rs in texts]
        self.ref_logps = response_logps(model, self.encoded, tokenizer.pad_token_id)
        self.module = PreferenceModule(model, shape.alignexp_loss, {"beta": BETA}, OptimArgs(lr=LR))
        self.optimizer = self.module.configure_optimizers()["optimizer"]
        self.collate = Collator(tokenizer.pad_token_id)
        self.shape, self.step_index, self.torch = shape, 0, torch
        first = self.collate(self._items(0))
        real = sum(len(e.prompt_ids) + sum(map(len, e.response_ids)) for e, _ in self._items(0))
        flat = getattr(first, "flat", None) is not None and logprobs.padding_free_supported(model.get_decoder())
        shape = [1, int(first.flat.token_index.numel())] if flat else list(first.input_ids.shape)
        self.layout = {"rows x width": shape, "positions": shape[0] * shape[1], "tokens": real,
                       "padding-free": flat}

    def _items(self, index: int):
        b = self.shape.prompts
        start = (index * b) % len(self.encoded)
        return [(self.encoded[i], self.ref_logps[i]) for i in range(start, start + b)]

    def reference(self) -> list[list[float]]:
        return [r.tolist() for r in self.ref_logps]

    def step(self) -> None:
        batch = self.collate(self._items(self.step_index))
        self.step_index += 1
        out = self.module.compute_loss(batch)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.metrics = {"loss": out.loss.item(), **{k: v.item() for k, v in out.metrics.items()}}


class TrlSide:
    """TRL's step: DataCollatorForPreference -> DPOTrainer.training_step -> AdamW."""

    def __init__(self, shape: Shape, texts: list[tuple[str, list[str]]]):
        import torch
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from alignexp.models.logprobs import encode_example
        from alignexp.tasks.base import RankedExample

        model, tokenizer = build_tiny()
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        pairs = [(p, rs[k], rs[k + 1]) for p, rs in texts for k in range(len(rs) - 1)]
        data = Dataset.from_dict({"prompt": [bos + p for p, _, _ in pairs], "chosen": [c + eos for _, c, _ in pairs],
                                  "rejected": [r + eos for _, _, r in pairs]})
        self.pairs_per_batch = shape.prompts * (shape.n - 1)
        self.output_dir = tempfile.TemporaryDirectory(prefix="alignexp-bench-trl-")
        config = DPOConfig(output_dir=self.output_dir.name, per_device_train_batch_size=self.pairs_per_batch,
                           precompute_ref_log_probs=True, beta=BETA, learning_rate=LR, loss_type="sigmoid",
                           max_length=None, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                           report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
                           dataloader_num_workers=0, seed=0)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        self.trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                  optimizers=(self.optimizer, None))
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step reads it
        columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
        dataset = self.trainer.train_dataset.select_columns(columns)
        self.rows = [dataset[i] for i in range(len(dataset))]
        # The same token ids as alignexp's side (BOS + prompt, response + EOS), checked here.
        for (p, c, r), row in zip(pairs, self.rows):
            ex = encode_example(tokenizer, RankedExample(p, [c, r]), 10**6, 10**6)
            if [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]] != [ex.prompt_ids, *ex.response_ids]:
                raise RuntimeError("TRL tokenised the benchmark data differently from alignexp")
        self.collate = self.trainer.data_collator
        self.step_index = 0
        first = self.collate(self._rows(0))
        self.layout = {"rows x width": list(first["input_ids"].shape), "positions": int(first["input_ids"].numel()),
                       "tokens": int(first["attention_mask"].sum())}

    def _rows(self, index: int):
        b = self.pairs_per_batch
        start = (index * b) % len(self.rows)
        return self.rows[start:start + b]

    def reference(self) -> list[list[float]]:
        chosen = [row["ref_chosen_logps"] for row in self.rows]
        rejected = [row["ref_rejected_logps"] for row in self.rows]
        return [[c, r] for c, r in zip(chosen, rejected)]

    def step(self) -> None:
        inputs = self.collate(self._rows(self.step_index))
        self.step_index += 1
        self.trainer.training_step(self.trainer.model, inputs)
        self.optimizer.step()
        self.optimizer.zero_grad()


def build_tiny(vocab: int | None = None):
    """The tiny model of ``conf/model/tiny.yaml`` (SDPA attention, fp32) and its byte tokenizer; ``vocab``
    rows in the embedding and the head instead of the tokenizer's 259 (e.g. a 7B model's 32000)."""
    from omegaconf import OmegaConf

    from alignexp.config import CONF_DIR
    from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer

    fields = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml"))
    if vocab is not None:
        fields["arch"] = {**fields["arch"], "vocab_size": vocab}
    args = ModelArgs(**{**fields, "attn_implementation": "sdpa", "dtype": "float32"})
    tokenizer = build_tokenizer(args)
    return build_model(args, tokenizer, "cpu"), tokenizer


# --------------------------------------------------------------------------- worker and driver


@dataclass(frozen=True)
class SideSpec:
    """A side of a comparison: ``kind`` "alignexp" or "trl"; ``vocab``: see :func:`build_tiny`; ``logit_chunk``:
    :data:`alignexp.models.logprobs.LOGIT_CHUNK` in that side's process (None: the default)."""

    label: str
    kind: str
    vocab: int | None = None
    logit_chunk: int | None = None


PREFERENCE_SIDES = (SideSpec("alignexp", "alignexp"), SideSpec("TRL", "trl"))


def _worker(conn: Connection, spec: SideSpec, shape_name: str, n_batches: int, threads: int, warmup: int) -> None:
    """One side in its own process: build, warm up, then run the parent's commands."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP, below
    os.environ.setdefault("TQDM_DISABLE", "1")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    side = spec.label
    try:
        if spec.logit_chunk is not None:
            from alignexp.models import logprobs

            logprobs.LOGIT_CHUNK = spec.logit_chunk
        texts = make_texts(shape, n_batches)
        runner = AlignexpSide(shape, texts, spec.vocab) if spec.kind == "alignexp" else TrlSide(shape, texts)
        for _ in range(warmup):
            runner.step()
        conn.send({"ready": True, "layout": runner.layout, "reference": runner.reference()})
        while True:
            command, arg = conn.recv()
            if command == "steps":
                times = []
                for _ in range(arg):
                    start, cpu = time.perf_counter(), time.process_time()
                    runner.step()
                    times.append((time.perf_counter() - start, time.process_time() - cpu))
                conn.send(times)
            elif command == "memory":  # one pass over every batch, for each of the two probes
                def one_pass() -> None:
                    for _ in range(n_batches):
                        runner.step()

                conn.send({"peak step MB": tensor_peak_mb(one_pass), "peak RSS +MB": rss_step_delta_mb(one_pass)})
            elif command == "profile":  # self CPU time per operator over one step per batch, ms per step
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(n_batches):
                        runner.step()
                conn.send({e.key: e.self_cpu_time_total / 1000 / n_batches for e in prof.key_averages()})
            else:
                conn.send(None)
                return
    except Exception as error:  # report it to the parent rather than hang it
        import traceback

        conn.send({"error": f"{side}: {error!r}\n{traceback.format_exc()}"})


@dataclass
class SideResult:
    """One side's figures: median wall time and CPU time (all its threads) per step, in seconds."""

    median_s: float
    median_cpu_s: float
    times_s: list[float]
    memory: dict[str, float | None]
    layout: dict


def run_sides(shape: Shape, specs: tuple[SideSpec, ...], steps: int, per_turn: int, warmup: int, threads: int,
              n_batches: int, profile_rows: int = 0) -> tuple[dict[str, SideResult], dict[str, dict]]:
    """The sides of one shape, each in its own process, alternated; returns their results and what each sent
    when ready (its layout and reference log-probs), by label.

    With ``profile_rows``, also prints the operators that take the most CPU time on either side.
    """
    ctx = mp.get_context("spawn")
    sides = tuple(spec.label for spec in specs)
    conns, procs, ready = {}, {}, {}
    for spec in specs:  # started one after the other, so setup does not compete with the other side
        side = spec.label
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, spec, shape.name, n_batches, threads, warmup), daemon=True)
        proc.start()
        conns[side], procs[side] = parent, proc
        ready[side] = _receive(parent, side)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in sides}
    turn = 0
    while min(len(t) for t in times.values()) < steps:
        order = sides if turn % 2 == 0 else sides[::-1]  # each round starts with the other side
        for side in order:
            conns[side].send(("steps", per_turn))
            times[side].extend(_receive(conns[side], side))
        turn += 1
    memory, profiles = {}, {}
    for side in sides:
        conns[side].send(("memory", None))
        memory[side] = _receive(conns[side], side)
        if profile_rows:
            conns[side].send(("profile", None))
            profiles[side] = _receive(conns[side], side)
        conns[side].send(("quit", None))
        _receive(conns[side], side)
        procs[side].join(timeout=30)
    if profile_rows:
        _print_profile(profiles, profile_rows)
    results = {s: SideResult(statistics.median(w for w, _ in times[s]), statistics.median(c for _, c in times[s]),
                             [w for w, _ in times[s]], memory[s], ready[s]["layout"]) for s in sides}
    return results, ready


def _print_profile(profiles: dict[str, dict[str, float]], rows: int) -> None:
    """The ``rows`` operators with the most self CPU time (all sides summed), in ms per step."""
    labels = list(profiles)
    keys = sorted(set().union(*profiles.values()), key=lambda k: -sum(p.get(k, 0.0) for p in profiles.values()))
    print("  self CPU time per step, ms (torch.profiler; all threads): " + " ".join(f"{x:>9s}" for x in labels))
    for key in keys[:rows]:
        print(f"    {key[:60]:60s} " + " ".join(f"{profiles[x].get(key, 0.0):9.1f}" for x in labels))
    print(f"    {'total':60s} " + " ".join(f"{sum(profiles[x].values()):9.1f}" for x in labels))


def _receive(conn: Connection, side: str):
    message = conn.recv()
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(message["error"])
    return message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="dpo,tldr", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (after warm-up)")
    parser.add_argument("--per-turn", type=int, default=2, help="steps a side runs before the other takes over")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each side's process")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches the steps cycle through")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators that take the most CPU time (one profiled pass)")
    parser.add_argument("--vocab-steps", type=int, default=6,
                        help="timed steps per side of the 32k-vocabulary log-prob memory rows")


def shape_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    return names


def _print_sides(results: dict[str, SideResult]) -> None:
    print(f"  {'':22s} {'median step':>12s} {'CPU/step':>10s} {'peak step MB':>13s} {'peak RSS +MB':>13s}  "
          "batch layout (positions computed, tokens in the data)")
    for label, r in results.items():
        rss = r.memory["peak RSS +MB"]
        print(f"  {label:22s} {r.median_s * 1000:9.1f} ms {r.median_cpu_s * 1000:7.1f} ms "
              f"{r.memory['peak step MB']:13.1f} {(f'{rss:.1f}' if rss is not None else 'n/a'):>13s}  "
              f"{r.layout['rows x width'][0]} x {r.layout['rows x width'][1]} = {r.layout['positions']}"
              f" positions, {r.layout['tokens']} tokens{' (padding-free)' if r.layout.get('padding-free') else ''}")


def preference_rows(args: argparse.Namespace, names: list[str]) -> dict:
    """alignexp's preference step against TRL's DPOTrainer, for each shape in ``names``."""
    import torch
    import transformers
    import trl

    print(f"\n== Preference step: alignexp vs TRL {trl.__version__} DPOTrainer (transformers "
          f"{transformers.__version__}, torch {torch.__version__}), CPU fp32, {args.threads} threads per side, "
          "tiny 2-layer Llama")
    print("step = collate + forward + loss + backward + AdamW step + zero_grad (+ metrics to floats); "
          f"median of {args.steps} steps per side after {args.warmup} warm-up; each side in its own process, "
          f"the two alternated every {args.per_turn} steps")
    print("memory, over one pass through every batch: peak step MB = most live tensor bytes during a step above "
          "those live before (torch.profiler allocator events); peak RSS +MB = resident-set high-water mark "
          "minus the resident set before")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')} in both sides' processes")
    out: dict = {"trl": trl.__version__, "threads": args.threads, "steps": args.steps, "shapes": {}}
    for name in names:
        shape = SHAPES[name]
        print(f"\n[{name}] {shape.description}; alignexp loss {shape.alignexp_loss}", flush=True)
        results, ready = run_sides(shape, PREFERENCE_SIDES, args.steps, args.per_turn, args.warmup, args.threads,
                                   args.batches, args.profile)
        ours, theirs = results["alignexp"], results["TRL"]
        # TRL's rows are the adjacent pairs (k, k+1) of each ranking, in order.
        pairs = [(lp[k], lp[k + 1]) for lp in ready["alignexp"]["reference"] for k in range(len(lp) - 1)]
        ref_diff = max(abs(a - b) for mine, theirs_ in zip(pairs, ready["TRL"]["reference"])
                       for a, b in zip(mine, theirs_))
        ratio, cpu_ratio = ours.median_s / theirs.median_s, ours.median_cpu_s / theirs.median_cpu_s
        mem_ratio = ours.memory["peak step MB"] / theirs.memory["peak step MB"]
        print(f"  reference log-probs of the two sides agree to {ref_diff:.1e} nats (max |difference|)")
        _print_sides(results)
        verdict = "met" if ratio <= shape.target and mem_ratio <= 1 else "MISSED"
        print(f"  ratio alignexp/TRL: time {ratio:.3f} (CPU time {cpu_ratio:.3f}), peak step memory {mem_ratio:.3f}"
              f"  [target: time <= {shape.target}, memory <= 1: {verdict}]")
        out["shapes"][name] = {"shape": asdict(shape), "time_ratio": ratio, "cpu_time_ratio": cpu_ratio,
                               "memory_ratio": mem_ratio, "ref_logps_max_abs_diff": ref_diff,
                               "alignexp": asdict(ours), "trl": asdict(theirs)}
    return out


VOCAB = 32_000


def logit_memory_rows(args: argparse.Namespace, names: list[str]) -> dict:
    """alignexp's step on the tiny model with a 32k vocabulary, the output head's log-softmax in chunks
    (:data:`alignexp.models.logprobs.LOGIT_CHUNK`, the default) and in one piece over every response token."""
    from alignexp.models.logprobs import LOGIT_CHUNK

    print(f"\n== Log-prob memory at a {VOCAB:,}-token vocabulary: alignexp's step (the tiny model with {VOCAB} "
          f"rows in its embedding and head), the head's fp32 log-softmax in chunks of {LOGIT_CHUNK // VOCAB} tokens "
          f"(now) against one chunk of every response token (before); median of {args.vocab_steps} steps per side")
    specs = (SideSpec("chunked (now)", "alignexp", VOCAB), SideSpec("one piece (before)", "alignexp", VOCAB, 2**62))
    out: dict = {"vocab": VOCAB, "logit_chunk": LOGIT_CHUNK, "shapes": {}}
    for name in names:
        shape = SHAPES[name]
        print(f"\n[{name}] {shape.description}", flush=True)
        results, _ = run_sides(shape, specs, args.vocab_steps, args.per_turn, 1, args.threads, args.batches)
        _print_sides(results)
        now, before = results[specs[0].label], results[specs[1].label]
        mem_ratio = now.memory["peak step MB"] / before.memory["peak step MB"]
        print(f"  ratio now/before: peak step memory {mem_ratio:.3f}, time {now.median_s / before.median_s:.3f}")
        out["shapes"][name] = {"memory_ratio": mem_ratio, "time_ratio": now.median_s / before.median_s,
                               "now": asdict(now), "before": asdict(before)}
    return out
