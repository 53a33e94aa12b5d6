"""``python -m alignexp.sample``: n candidates per prompt from a policy, as JSONL, resumable.

One line per prompt, in prompt order::

    {"index": i, "prompt": ..., "responses": [n texts, in sampled order], "logps": [n summed policy
     log-probs], "num_tokens": [...], "finished": [n bools: EOS reached], "scores": [n judge scores],
     "judge": "gold"}

(``scores``/``judge`` only with ``judge=...``; a score the judge abstained on is null). The policy is ``policy=`` (a run's HF folder), else
``model.path``, else the task's SFT policy (trained and cached when missing, as train.py does).

**Resuming.** Lines are appended chunk by chunk (``chunk_size`` prompts, flushed and fsynced). A rerun
with the same ``output=`` reads the file, drops a torn last line and any incomplete chunk, and goes on
from there; since every (prompt, sample) has its own random stream (``sample_seed``) and the chunks
are fixed, an interrupted-and-resumed file is byte-identical to an uninterrupted one. The settings
are kept next to the file (``<output>.meta.json``); a rerun with different settings is refused.

Examples::

    python -m alignexp.sample n=8 output=outputs/samples/sft.jsonl
    python -m alignexp.sample policy=outputs/synthetic/dpo/<run>/policy split=eval judge=gold
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from alignexp.args import ModelArgs, RunArgs
from alignexp.config import CONF_DIR, build_task, setup_runtime, validate
from alignexp.errors import ConfigError, run_cli
from alignexp.files import digest
from alignexp.judges import build_judge
from alignexp.judges.base import Judge
from alignexp.sampling.engine import SamplingParams
from alignexp.sampling.text import decode, sample_responses
from alignexp.tasks.base import Task, Text

log = logging.getLogger("alignexp.sample")


class SampleError(ConfigError):
    """Bad settings or an output file that does not match them; the message names the key or file."""


@dataclass
class SampleArgs:
    n: int = 4
    chunk_size: int = 16
    batch_size: int = 64
    seed: int = 0
    max_prompt_len: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self):
        if self.n < 1:
            raise SampleError(f"n must be >= 1, got {self.n}")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise SampleError(f"chunk_size and batch_size must be >= 1, got {self.chunk_size}, {self.batch_size}")
        try:
            _ = self.params
        except ValueError as error:
            raise SampleError(f"sampling: {error}") from None

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens)


def resume_point(path: Path, chunk_size: int, total: int) -> int:
    """How many prompts ``path`` holds in complete chunks; the file is truncated to them (a torn last
    line or a partly written chunk is dropped). Raises SampleError for a line out of order."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # the part after the last newline is torn (or empty)
    offsets, offset = [], 0
    for number, line in enumerate(lines):
        try:
            index = json.loads(line)["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a damaged line: everything from here is redone
        if index != number:
            raise SampleError(f"{path}, line {number + 1}: prompt index {index}, expected {number}; "
                              f"not a file this command wrote (choose another output=)")
        offset += len(line) + 1
        offsets.append(offset)
    done = len(offsets)
    if done < total:
        done -= done % chunk_size
    done = min(done, total)
    keep = offsets[done - 1] if done else 0
    if keep != len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done


def check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``<output>.meta.json``, or check that an existing one holds the same settings."""
    meta_path = path.with_name(path.name + ".meta.json")
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        changed = sorted(k for k in set(previous) | set(meta) if previous.get(k) != meta.get(k))
        if changed:
            raise SampleError(f"{path} was written with other settings ({', '.join(changed)} differ, see "
                              f"{meta_path}); rerun with those settings or choose another output=")
        return
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def sample_to_jsonl(model, tokenizer, prompts: Sequence[Text], output: str | Path, args: SampleArgs, *,
                    judge: Judge | None = None, backend: Any = None, meta: dict[str, Any] | None = None,
                    progress: bool = True) -> int:
    """Append the samples of every prompt not yet in ``output`` (see the module docstring); returns how
    many prompts this call wrote."""
    from tqdm.auto import tqdm

    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_meta(path, {**(meta or {}), **asdict(args), "n_prompts": len(prompts),
                      "prompts": digest(list(prompts)), "judge": getattr(judge, "name", None)})
    done = resume_point(path, args.chunk_size, len(prompts))
    if done:
        log.info("%s: %d of %d prompts already sampled, resuming", path, done, len(prompts))
    bar = tqdm(total=len(prompts), initial=done, unit="prompt", desc="sampling", disable=not progress,
               dynamic_ncols=True)
    start, written = time.time(), 0
    with path.open("a", encoding="utf-8") as handle:
        for first in range(done, len(prompts), args.chunk_size):
            chunk = list(prompts[first:first + args.chunk_size])
            rows = sample_responses(model, tokenizer, chunk, args.n, args.params, seed=args.seed,
                                    max_prompt_len=args.max_prompt_len, batch_size=args.batch_size,
                                    first_index=first, backend=backend)
            texts = [[decode(tokenizer, g) for g in row] for row in rows]
            scores = None
            if judge is not None:
                flat = judge.score([p for p, row in zip(chunk, texts) for _ in row], [t for row in texts for t in row])
                scores = [flat[i * args.n:(i + 1) * args.n] for i in range(len(chunk))]
            lines = []
            for i, (prompt, row, gens) in enumerate(zip(chunk, texts, rows)):
                record: dict[str, Any] = {"index": first + i, "prompt": prompt, "responses": row,
                                          "logps": [sum(g.logprobs) for g in gens],
                                          "num_tokens": [len(g.token_ids) for g in gens],
                                          "finished": [g.finished for g in gens]}
                if scores is not None:  # an abstaining judge's NaN is written as null
                    record.update(scores=[None if math.isnan(v) else v for v in scores[i]], judge=judge.name)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            written += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(samples_per_s=f"{written * args.n / max(time.time() - start, 1e-9):.1f}")
    bar.close()
    return written


def resolve_policy(policy: str | None, args: RunArgs, task: Task) -> str:
    """``policy``, else ``model.path``, else the task's SFT policy (trained and cached when missing)."""
    from alignexp.pipeline.weights import ensure_sft_policy, resolve_weights

    path = resolve_weights(policy, args.model, task, True, lambda: ensure_sft_policy(args, task))
    if path is None:
        raise SampleError(f"policy: task '{task.name}' has no SFT policy of its own; set policy=<HF folder> "
                          f"(e.g. a run's policy/) or model.path=")
    return path


def run(cfg: DictConfig) -> Path:
    """Sample as configured; returns the output file."""
    from omegaconf import OmegaConf

    from alignexp.models.backbone import build_model, build_tokenizer
    from alignexp.preflight import preflight_sample
    from alignexp.scale.hardware import resolve_auto

    args = resolve_auto(validate(cfg), single_process=True)  # one process: the CPU or one GPU
    setup_runtime(args.seed, args.hardware.threads, verbose=bool(cfg.get("verbose", False)))
    if cfg.split not in ("train", "eval"):
        raise SampleError(f"split must be train or eval, got {cfg.split!r}")
    sample_args = SampleArgs(n=cfg.n, chunk_size=cfg.chunk_size, batch_size=cfg.batch_size, seed=args.seed,
                             max_prompt_len=args.model.max_prompt_len,
                             **OmegaConf.to_container(cfg.sampling, resolve=True))
    task = build_task(args.task)
    preflight_sample(args, task, cfg.get("policy"), cfg.split, Path(cfg.output))
    policy_path = resolve_policy(cfg.get("policy"), args, task)
    policy_args: ModelArgs = args.model.with_path(policy_path)
    tokenizer = build_tokenizer(policy_args)
    prompts = task.prompts(cfg.split)
    if cfg.max_prompts:
        prompts = prompts[:cfg.max_prompts]

    from alignexp.sampling.vllm_backend import VLLMEngine, choose_backend

    try:
        choice = choose_backend(args.backend)
    except RuntimeError as error:
        raise SampleError(str(error)) from None
    use_vllm = choice.name == "vllm"
    backend, model = None, None
    if use_vllm:
        backend = VLLMEngine(policy_path)
    else:
        model = build_model(policy_args, tokenizer, args.hardware.device_type).to(args.hardware.torch_device)
    judge = build_judge(args.judge, task, key="judge", device=args.hardware.torch_device)
    output = Path(cfg.output)
    log.info("sampling %d prompts x %d from %s (%s) into %s", len(prompts), sample_args.n, policy_path,
             "vllm" if use_vllm else "hf", output)
    meta = {"policy": policy_path, "task": task.name, "split": cfg.split, "backend": "vllm" if use_vllm else "hf"}
    start = time.time()
    written = sample_to_jsonl(model, tokenizer, prompts, output, sample_args, judge=judge, backend=backend,
                              meta=meta)
    seconds = time.time() - start
    print(f"[alignexp] {written} prompts sampled ({written * sample_args.n / max(seconds, 1e-9):.1f} samples/s), "
          f"{len(prompts)} in {output}", flush=True)
    if judge is not None and getattr(judge, "stats", None):
        print(f"[alignexp] judge stats: {dict(judge.stats)}", flush=True)
    return output


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
