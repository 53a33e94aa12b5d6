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
    target: float | None
    description: str
    memory_target: float | None = 1.0
    model: str = "tiny"
    """``tiny``: the model of ``conf/model/tiny.yaml`` and its byte tokenizer, random text of one byte per token;
    ``real``: the model folder given by ``--real-model`` (SmolLM2-135M) and its own tokenizer, text of English
    words (:func:`make_word_texts`)."""


SHAPES = {
    "dpo": Shape("dpo", 8, 2, (16, 64), (8, 112), 128, "dpo", 0.6,
                 "DPO-shaped: 8 pairs/batch, prompt 16-64 tokens, prompt + response <= 128"),
    "tldr": Shape("tldr", 8, 4, (256, 512), (32, 64), None, "ranked_dpo", 0.3,
                  "TL;DR-shaped: 8 prompts/batch, rankings of 4, prompts 256-512 tokens, responses 32-64"),
}
REAL_SHAPES = {
    "smol-dpo": Shape("smol-dpo", 8, 2, (16, 64), (8, 112), 128, "dpo", 0.33,
                      "DPO-shaped: 8 pairs/batch, prompt 16-64 tokens, prompt + response <= 128", 0.3, "real"),
    "smol-ranked": Shape("smol-ranked", 1, 4, (128, 256), (32, 64), None, "ranked_dpo", 0.2,
                         "ranked, small enough for TRL: 1 prompt/batch, a ranking of 4, prompt 128-256 tokens, "
                         "responses 32-64", None, "real"),
    "smol-tldr": Shape("smol-tldr", 8, 4, (256, 512), (32, 64), None, "ranked_dpo", None,
                       "TL;DR-shaped: 8 prompts/batch, rankings of 4, prompts 256-512 tokens, responses 32-64",
                       None, "real"),
}
TINY_SHAPES = dict(SHAPES)
SHAPES.update(REAL_SHAPES)
REAL_MODEL_ASSET = "smollm2-135m"
WORDS = ("the a an of to and in that it is was for on with as his her they this but film movie story plot "
         "character actor actress scene director script music ending time life love world man woman family "
         "friend night year day way end part role performance good bad great best worst funny dark long short "
         "slow new old real simple strong weak first last little big young beautiful boring brilliant "
         "predictable memorable wonderful terrible makes made sees finds takes gives tells shows plays seems "
         "feels works looks comes goes wants tries never always still just even only also very really quite "
         "too almost again here there when where while after before because though every some most many all "
         "one two three few other same own such no not more less well much better worse enough").split()


def default_real_model() -> Path:
    """Where ``python -m alignexp.assets fetch smollm2-135m`` builds the model folder:
    ``$ALIGNEXP_CACHE_DIR/assets/smollm2-135m`` (default ``.cache/alignexp``, relative to the working folder)."""
    return Path(os.environ.get("ALIGNEXP_CACHE_DIR", ".cache/alignexp")) / "assets" / REAL_MODEL_ASSET


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


def make_word_texts(shape: Shape, n_batches: int, tokenizer, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Like :func:`make_texts` for a real tokenizer: text of English words (:data:`WORDS`), each response
    starting with a space, with the lengths of ``shape`` counted in the tokens alignexp gives (BOS + prompt,
    response + EOS; :func:`encode_rows`), the longest responses cut a word at a time to ``shape.max_total``."""
    rng = random.Random(seed)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + BOS or EOS

    def words(tokens: int, lead: str) -> str:
        out = ""
        while True:
            longer = out + (" " if out or lead else "") + rng.choice(WORDS)
            if count(longer) > tokens and out:
                return out
            out = longer

    rows = []
    for _ in range(n_batches * shape.prompts):
        prompt = words(rng.randint(*shape.prompt_len), "").capitalize() + "."
        p = count(prompt)
        top = shape.response_len[1] if shape.max_total is None else min(shape.response_len[1], shape.max_total - p)
        rows.append((prompt, [words(rng.randint(min(shape.response_len[0], top), top), " ")
                              for _ in range(shape.n)]))
    return rows


def encode_rows(tokenizer, texts: list[tuple[str, list[str]]]):
    """alignexp's token ids of the benchmark's texts (:func:`alignexp.models.logprobs.encode_example`: the
    prompt and each response tokenised apart, BOS + prompt, response + EOS): what both sides are fed."""
    from alignexp.models.logprobs import encode_example
    from alignexp.tasks.base import RankedExample

    return [encode_example(tokenizer, RankedExample(p, rs), 10**6, 10**6) for p, rs in texts]


def trl_rows(encoded) -> list[dict[str, list[int]]]:
    """TRL's rows for the same ids: the adjacent pairs (k, k+1) of each ranking, in order, as the
    ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` that TRL's own tokenisation would produce."""
    return [{"prompt_ids": list(e.prompt_ids), "chosen_ids": list(e.response_ids[k]),
             "rejected_ids": list(e.response_ids[k + 1])} for e in encoded for k in range(len(e.response_ids) - 1)]


# --------------------------------------------------------------------------- the two sides


class AlignexpSide:
    """alignexp's step: Collator -> PreferenceModule.compute_loss -> backward -> AdamW."""

    def __init__(self, shape: Shape, texts: list[tuple[str, list[str]]], model, tokenizer):
        import torch

        from alignexp.lightning_modules.datamodule import Collator
        from alignexp.lightning_modules.preference import OptimArgs, PreferenceModule
        from alignexp.models import logprobs
        from alignexp.models.reference import response_logps

        self.encoded = encode_rows(tokenizer, texts)
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
    """TRL's step: DataCollatorForPreference -> DPOTrainer.training_step -> AdamW.

    TRL is handed alignexp's token ids (:func:`trl_rows`), not the text: TRL 1.16 tokenises prompt + completion
    together and cuts at the longest common prefix with the prompt alone, so with a BPE tokenizer tokens can
    merge across the boundary and the two sides would compute different sequences. ``own_tokenisation``
    counts the pairs whose ids TRL's own tokenisation of the same text would change (it is not used).
    """

    def __init__(self, shape: Shape, texts: list[tuple[str, list[str]]], model, tokenizer):
        import torch
        from datasets import Dataset
        from trl import DPOConfig

        rows = trl_rows(encode_rows(tokenizer, texts))
        data = Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]})
        self.pairs_per_batch = shape.prompts * (shape.n - 1)
        self.output_dir = tempfile.TemporaryDirectory(prefix="alignexp-bench-trl-")
        config = DPOConfig(output_dir=self.output_dir.name, per_device_train_batch_size=self.pairs_per_batch,
                           precompute_ref_log_probs=True, precompute_ref_batch_size=2, beta=BETA, learning_rate=LR,
                           loss_type="sigmoid", max_length=None, bf16=False, fp16=False,
                           gradient_checkpointing=False, use_cpu=True, report_to=[], logging_strategy="no",
                           save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        self.trainer = pretokenised_trainer()(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                              optimizers=(self.optimizer, None))
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); training_step reads it
        columns = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]
        dataset = self.trainer.train_dataset.select_columns(columns)
        self.rows = [dataset[i] for i in range(len(dataset))]
        if [[r[k] for k in columns[:3]] for r in self.rows] != [[r[k] for k in columns[:3]] for r in rows]:
            raise RuntimeError("TRL's dataset does not hold the token ids it was given")
        self.own_tokenisation = own_tokenisation_differs(self.trainer, texts, rows)
        self.collate = self.trainer.data_collator
        self.step_index = 0
        first = self.collate(self._rows(0))
        self.layout = {"rows x width": list(first["input_ids"].shape), "positions": int(first["input_ids"].numel()),
                       "tokens": int(first["attention_mask"].sum()), "own tokenisation": self.own_tokenisation}

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


def pretokenised_trainer():
    """A DPOTrainer subclass that takes a dataset already holding ``prompt_ids``, ``chosen_ids`` and
    ``rejected_ids`` as it is (TRL 1.16 has no switch for that; other datasets go through TRL's own
    preparation)."""
    from trl import DPOTrainer

    class PretokenisedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenisedDPOTrainer


def own_tokenisation_differs(trainer, texts: list[tuple[str, list[str]]], rows: list[dict]) -> dict[str, int]:
    """How many of ``rows`` (alignexp's ids) TRL's own preparation of the same text changes: the text as TRL's
    users give it (prompt with the BOS token's text, responses; TRL adds the EOS), through TRL 1.16's
    ``DPOTrainer._prepare_dataset`` (prompt + completion tokenised together, cut at the common prefix)."""
    from datasets import Dataset
    from trl import DPOTrainer

    tokenizer = trainer.processing_class
    bos = tokenizer.bos_token or ""
    pairs = [(bos + p, rs[k], rs[k + 1]) for p, rs in texts for k in range(len(rs) - 1)]
    data = Dataset.from_dict({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                              "rejected": [r for _, _, r in pairs]})
    own = DPOTrainer._prepare_dataset(trainer, data, tokenizer, trainer.args, "text")
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    differ = sum(any(list(own[i][k]) != row[k] for k in keys) for i, row in enumerate(rows))
    return {"pairs": len(rows), "differ": differ}


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
    model_path: str | None = None
    """The real model's folder, for shapes with ``model == "real"``."""
    cap_gb: float | None = None
    """The side's process may hold at most this much memory (``RLIMIT_DATA``): past it an allocation fails
    and the side is reported as not fitting, rather than the machine running out of memory."""


PREFERENCE_SIDES = (SideSpec("alignexp", "alignexp"), SideSpec("TRL", "trl"))


class DidNotFit(RuntimeError):
    """A side's allocation failed under its memory cap (or its process ended without a word)."""


def build_side_model(shape: Shape, spec: SideSpec):
    """The model and tokenizer of a side: the tiny model (:func:`build_tiny`), or the real model's folder
    loaded as a run loads ``model.path`` (SDPA attention, fp32)."""
    if shape.model != "real":
        return build_tiny(spec.vocab)
    from alignexp.args import ModelArgs
    from alignexp.models.backbone import build_model, build_tokenizer

    args = ModelArgs(name="real", path=spec.model_path, attn_implementation="sdpa", dtype="float32")
    tokenizer = build_tokenizer(args)
    return build_model(args, tokenizer, "cpu"), tokenizer


def _is_memory_error(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "can't allocate memory" in str(error) or \
        "Cannot allocate memory" in str(error)


def _worker(conn: Connection, spec: SideSpec, shape_name: str, n_batches: int, threads: int, warmup: int) -> None:
    """One side in its own process: build, warm up, then run the parent's commands."""
    if spec.cap_gb is not None:
        import resource

        cap = int(spec.cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
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
        model, tokenizer = build_side_model(shape, spec)
        texts = make_word_texts(shape, n_batches, tokenizer) if shape.model == "real" else make_texts(shape, n_batches)
        runner = (AlignexpSide if spec.kind == "alignexp" else TrlSide)(shape, texts, model, tokenizer)
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

        conn.send({"error": f"{side}: {error!r}\n{traceback.format_exc()}", "memory": _is_memory_error(error)})


@dataclass
class SideResult:
    """One side's figures: median wall time and CPU time (all its threads) per step, in seconds."""

    median_s: float
    median_cpu_s: float
    times_s: list[float]
    memory: dict[str, float | None]
    layout: dict


def run_sides(shape: Shape, specs: tuple[SideSpec, ...], steps: int, per_turn: int, warmup: int, threads: int,
              n_batches: int, profile_rows: int = 0) -> tuple[dict[str, SideResult | None], dict[str, dict]]:
    """The sides of one shape, each in its own process, alternated; returns their results and what each sent
    when ready (its layout and reference log-probs), by label.

    A side whose allocation fails under its memory cap (:attr:`SideSpec.cap_gb`) is stopped there: its result is
    None and what it sent is ``{"did not fit": reason}``; the other sides go on. With ``profile_rows``, also
    prints the operators that take the most CPU time on either side.
    """
    ctx = mp.get_context("spawn")
    sides = tuple(spec.label for spec in specs)
    caps = {spec.label: spec.cap_gb for spec in specs}
    conns, procs, ready = {}, {}, {}
    live: list[str] = []

    def drop(side: str, error: DidNotFit) -> None:
        ready[side] = {"did not fit": f"did not fit under {caps[side]:g} GB ({error})"}
        if side in live:
            live.remove(side)
        procs[side].join(timeout=30)
        if procs[side].is_alive():
            procs[side].kill()

    for spec in specs:  # started one after the other, so setup does not compete with the other side
        side = spec.label
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, spec, shape.name, n_batches, threads, warmup), daemon=True)
        proc.start()
        conns[side], procs[side] = parent, proc
        try:
            ready[side] = _receive(parent, side, caps[side])
            live.append(side)
        except DidNotFit as error:
            drop(side, error)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in sides}
    turn = 0
    while live and min(len(times[s]) for s in live) < steps:
        order = list(live) if turn % 2 == 0 else list(live)[::-1]  # each round starts with the other side
        for side in order:
            try:
                conns[side].send(("steps", per_turn))
                times[side].extend(_receive(conns[side], side, caps[side]))
            except DidNotFit as error:
                drop(side, error)
        turn += 1
    memory, profiles = {}, {}
    for side in list(live):
        try:
            conns[side].send(("memory", None))
            memory[side] = _receive(conns[side], side, caps[side])
            if profile_rows:
                conns[side].send(("profile", None))
                profiles[side] = _receive(conns[side], side, caps[side])
            conns[side].send(("quit", None))
            _receive(conns[side], side, caps[side])
            procs[side].join(timeout=30)
        except DidNotFit as error:
            drop(side, error)
    if profile_rows and profiles:
        _print_profile(profiles, profile_rows)
    results = {s: (SideResult(statistics.median(w for w, _ in times[s]), statistics.median(c for _, c in times[s]),
                              [w for w, _ in times[s]], memory[s], ready[s]["layout"]) if s in live else None)
               for s in sides}
    return results, ready


def _print_profile(profiles: dict[str, dict[str, float]], rows: int) -> None:
    """The ``rows`` operators with the most self CPU time (all sides summed), in ms per step."""
    labels = list(profiles)
    keys = sorted(set().union(*profiles.values()), key=lambda k: -sum(p.get(k, 0.0) for p in profiles.values()))
    print("  self CPU time per step, ms (torch.profiler; all threads): " + " ".join(f"{x:>9s}" for x in labels))
    for key in keys[:rows]:
        print(f"    {key[:60]:60s} " + " ".join(f"{profiles[x].get(key, 0.0):9.1f}" for x in labels))
    print(f"    {'total':60s} " + " ".join(f"{sum(profiles[x].values()):9.1f}" for x in labels))


def _receive(conn: Connection, side: str, cap_gb: float | None = None):
    """The side's next message; its error raised (:class:`DidNotFit` for an allocation that failed under a memory
    cap, or a capped process that ended without a word)."""
    try:
        message = conn.recv()
    except EOFError:
        if cap_gb is not None:
            raise DidNotFit(f"{side}: its process ended without a word") from None
        raise RuntimeError(f"{side}: its process ended without a word") from None
    if isinstance(message, dict) and "error" in message:
        if message.get("memory") and cap_gb is not None:
            raise DidNotFit(message["error"].splitlines()[0])
        raise RuntimeError(message["error"])
    return message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="dpo,tldr", help="comma-separated: " + ", ".join(TINY_SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (after warm-up)")
    parser.add_argument("--per-turn", type=int, default=2, help="steps a side runs before the other takes over")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each side's process")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches the steps cycle through")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N operators that take the most CPU time (one profiled pass)")
    parser.add_argument("--vocab-steps", type=int, default=6,
                        help="timed steps per side of the 32k-vocabulary log-prob memory rows")
    real = parser.add_argument_group("the real model (part `real`)")
    real.add_argument("--real-model", type=Path, default=default_real_model(),
                      help="the model folder (default: $ALIGNEXP_CACHE_DIR/assets/smollm2-135m, which `make assets` "
                           "builds; default ALIGNEXP_CACHE_DIR: .cache/alignexp)")
    real.add_argument("--real-shapes", default=",".join(REAL_SHAPES), help="comma-separated: " + ", ".join(REAL_SHAPES))
    real.add_argument("--real-steps", type=int, default=4, help="timed steps per side on the real model")
    real.add_argument("--real-warmup", type=int, default=1, help="untimed steps per side on the real model")
    real.add_argument("--real-batches", type=int, default=1, help="distinct batches on the real model")
    real.add_argument("--real-cap-gb", type=float, default=14.0,
                      help="memory cap of each side's process on the real model: a side that needs more is "
                           "reported as not fitting")


def shape_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    return _names(parser, "--shapes", args.shapes, TINY_SHAPES)


def real_shape_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    return _names(parser, "--real-shapes", args.real_shapes, REAL_SHAPES)


def _names(parser: argparse.ArgumentParser, option: str, value: str, known: dict) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"{option}: unknown shape(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _print_sides(results: dict[str, SideResult | None], ready: dict[str, dict] | None = None) -> None:
    print(f"  {'':22s} {'median step':>12s} {'CPU/step':>10s} {'peak step MB':>13s} {'peak RSS +MB':>13s}  "
          "batch layout (positions computed, tokens in the data)")
    for label, r in results.items():
        if r is None:
            print(f"  {label:22s} {(ready or {}).get(label, {}).get('did not fit', 'no result')}")
            continue
        rss = r.memory["peak RSS +MB"]
        print(f"  {label:22s} {r.median_s * 1000:9.1f} ms {r.median_cpu_s * 1000:7.1f} ms "
              f"{r.memory['peak step MB']:13.1f} {(f'{rss:.1f}' if rss is not None else 'n/a'):>13s}  "
              f"{r.layout['rows x width'][0]} x {r.layout['rows x width'][1]} = {r.layout['positions']}"
              f" positions, {r.layout['tokens']} tokens{' (padding-free)' if r.layout.get('padding-free') else ''}")


def _header(args: argparse.Namespace, model: str, steps: int, warmup: int) -> None:
    import torch
    import transformers
    import trl

    print(f"\n== Preference step: alignexp vs TRL {trl.__version__} DPOTrainer (transformers "
          f"{transformers.__version__}, torch {torch.__version__}), CPU fp32, {args.threads} threads per side, {model}")
    print("step = collate + forward + loss + backward + AdamW step + zero_grad (+ metrics to floats); "
          f"median of {steps} steps per side after {warmup} warm-up; each side in its own process, "
          f"the two alternated every {args.per_turn} steps; both sides fed the same token ids")
    print("memory, over one pass through every batch: peak step MB = most live tensor bytes during a step above "
          "those live before (torch.profiler allocator events); peak RSS +MB = resident-set high-water mark "
          "minus the resident set before")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')} in both sides' processes")


def _compare(shape: Shape, specs: tuple[SideSpec, ...], args: argparse.Namespace, steps: int, warmup: int,
             batches: int) -> dict:
    """One shape's rows: alignexp against TRL, with the ratios checked against the shape's targets."""
    print(f"\n[{shape.name}] {shape.description}; alignexp loss {shape.alignexp_loss}", flush=True)
    results, ready = run_sides(shape, specs, steps, args.per_turn, warmup, args.threads, batches, args.profile)
    ours, theirs = results["alignexp"], results["TRL"]
    own = ready["TRL"].get("layout", {}).get("own tokenisation")
    if own is not None:
        print(f"  token ids: TRL is handed alignexp's; TRL's own tokenisation of the same text would change "
              f"{own['differ']} of {own['pairs']} pairs")
    out: dict = {"shape": asdict(shape), "alignexp": asdict(ours) if ours else ready["alignexp"],
                 "trl": asdict(theirs) if theirs else ready["TRL"]}
    if ours is not None and theirs is not None:
        # TRL's rows are the adjacent pairs (k, k+1) of each ranking, in order.
        pairs = [(lp[k], lp[k + 1]) for lp in ready["alignexp"]["reference"] for k in range(len(lp) - 1)]
        out["ref_logps_max_abs_diff"] = max(abs(a - b) for mine, theirs_ in zip(pairs, ready["TRL"]["reference"])
                                            for a, b in zip(mine, theirs_))
        print(f"  reference log-probs of the two sides agree to {out['ref_logps_max_abs_diff']:.1e} nats "
              "(max |difference|)")
    _print_sides(results, ready)
    if ours is None or theirs is None:
        print("  ratio alignexp/TRL: none (a side did not fit); target: reported as it is")
        return out
    ratio, cpu_ratio = ours.median_s / theirs.median_s, ours.median_cpu_s / theirs.median_cpu_s
    mem_ratio = ours.memory["peak step MB"] / theirs.memory["peak step MB"]
    met = (shape.target is None or ratio <= shape.target) and \
        (shape.memory_target is None or mem_ratio <= shape.memory_target)
    targets = ", ".join(t for t in (f"time <= {shape.target}" if shape.target is not None else "",
                                    f"memory <= {shape.memory_target}" if shape.memory_target is not None else "")
                        if t) or "none"
    print(f"  ratio alignexp/TRL: time {ratio:.3f} (CPU time {cpu_ratio:.3f}), peak step memory {mem_ratio:.3f}"
          f"  [target: {targets}: {'met' if met else 'MISSED'}]")
    out.update(time_ratio=ratio, cpu_time_ratio=cpu_ratio, memory_ratio=mem_ratio)
    return out


def preference_rows(args: argparse.Namespace, names: list[str]) -> dict:
    """alignexp's preference step against TRL's DPOTrainer on the tiny model, for each shape in ``names``."""
    import trl

    _header(args, "tiny 2-layer Llama", args.steps, args.warmup)
    out: dict = {"trl": trl.__version__, "threads": args.threads, "steps": args.steps, "shapes": {}}
    for name in names:
        out["shapes"][name] = _compare(SHAPES[name], PREFERENCE_SIDES, args, args.steps, args.warmup, args.batches)
    return out


def real_preference_rows(args: argparse.Namespace, names: list[str]) -> dict:
    """The same on the real model's folder (``--real-model``), each side's process capped at ``--real-cap-gb``;
    TRL's side starts first, so that where it does not fit it is gone before alignexp's builds."""
    import trl

    path = str(args.real_model)
    _header(args, f"real model {path}", args.real_steps, args.real_warmup)
    print(f"each side's process capped at {args.real_cap_gb:g} GB (RLIMIT_DATA): a side that needs more is "
          "reported as not fitting")
    specs = (SideSpec("TRL", "trl", model_path=path, cap_gb=args.real_cap_gb),
             SideSpec("alignexp", "alignexp", model_path=path, cap_gb=args.real_cap_gb))
    out: dict = {"trl": trl.__version__, "model": path, "threads": args.threads, "steps": args.real_steps,
                 "cap_gb": args.real_cap_gb, "shapes": {}}
    for name in names:
        out["shapes"][name] = _compare(SHAPES[name], specs, args, args.real_steps, args.real_warmup,
                                       args.real_batches)
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
