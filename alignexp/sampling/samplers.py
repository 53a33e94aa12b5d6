"""Samplers: where each round's training rankings come from (the ``sampler`` config group).

A sampler runs for ``rounds`` rounds; before each round train.py asks it for the round's examples,
given a :class:`SamplerContext` holding the current policy, the reference (the SFT policy) and the
task.

* ``offline`` (one round): the task's data as it is (the synthetic task samples its rankings once
  from the SFT policy and labels them with the gold reward; they are cached on disk).
* ``rso`` (one round): RSO (Liu et al. 2023, Algorithm 1): ``num_candidates`` SFT samples per prompt,
  ``num_samples`` of them kept by statistical rejection sampling on the judge's rewards, ranked by
  reward; train.py pairs them (``pairs=first_round`` or ``tournament``) for ``dpo`` or ``hinge``.
* ``raft`` (``iterations`` rounds): RAFT (Dong et al. 2023, Algorithm 1): each round samples
  ``num_candidates`` responses per prompt from the **current** policy, keeps the best per prompt
  (``selection=per_prompt``) or the best ``top_fraction`` of the whole batch (``selection=global``),
  and train.py fine-tunes on them (``loss=raft``, SFT on the kept samples).
* ``self_bootstrap`` (``rounds`` rounds): PRO's self-bootstrapping (Song et al. 2023, Sec. 3.3): each
  round adds ``num_new`` samples of the current policy to every ranking of the task's data and re-ranks
  all with the judge, for a listwise loss (``loss=pro``).
* ``best_of_n``: the inference-time baseline; nothing is trained: it declares the ``best_of_n`` stage,
  which evaluates best-of-``n`` sampling of the SFT policy under the sampler's judge, at its analytic
  KL log n - (n - 1) / n (:func:`alignexp.metrics.reward.best_of_n_kl`).

``conf/sampler/<name>.yaml`` names each class with ``_target_``. The rewards of ``rso``, ``raft``,
``self_bootstrap`` and ``best_of_n`` come from the sampler's judge, an option of the ``judge`` group
(``judge@sampler.judge=reward_model sampler.judge.path=<folder>``; gold by default). Each round's
figures (mean reward of the candidates and of what was kept) are logged and kept in ``history``.
On N ranks, sampling is sharded over the ranks and gathered (:func:`draw`); the judge scores once, on
rank 0, and its verdicts are broadcast (an LLM judge's requests and counters are not repeated).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignexp.distributed import on_main, shard_map, shared_cache, world_size
from alignexp.errors import ConfigError
from alignexp.files import atomic_write_text, code_keyed, digest
from alignexp.inputs import check_judge
from alignexp.judges import build_judge
from alignexp.judges.base import Judge, ranked_example
from alignexp.sampling.engine import ENGINE_VERSION, SamplingParams
from alignexp.sampling.rejection import rejection_sample
from alignexp.sampling.text import decode, generated_tokens, sample_responses
from alignexp.tasks.base import RankedExample, SampledText, Task, Text
from alignexp.tasks.loading import NoExamples

log = logging.getLogger(__name__)

# The modules (besides the task's own) whose code shapes cached samples and preference data.
SAMPLING_CODE = ("alignexp.sampling.engine", "alignexp.sampling.samplers", "alignexp.sampling.text",
                 "alignexp.tasks.base")


@dataclass
class SamplerContext:
    """What a sampler may use. ``policy`` is the model being trained (updated between rounds)."""

    task: Task
    tokenizer: Any
    policy: Any
    reference: Any
    reference_key: str
    seed: int
    cache_dir: Path
    max_prompt_len: int
    max_response_len: int
    task_config: dict = field(default_factory=dict)
    backend: Any = None
    """None: the HF engine samples the model given; else a sampling backend (vLLM) given its weights first."""


def sampling_tag(backend: Any) -> str:
    """What drew a sample, for cache keys: the HF engine and its streams' version, or the backend's tag."""
    return backend.cache_tag if backend is not None else f"hf-engine{ENGINE_VERSION}"


def draw(model: Any, tokenizer: Any, prompts: list[Text], n: int, params: SamplingParams, *, seed: int,
         max_prompt_len: int, batch_size: int = 64, backend: Any = None) -> list[list[SampledText]]:
    """n samples per prompt, as text that carries the tokens sampled (:class:`SampledText`).

    ``backend``: None samples ``model`` with the HF engine; a backend (vLLM) is first given ``model``'s
    weights (:mod:`alignexp.sampling.vllm_backend`). On N ranks (every rank calls it; the HF engine) the
    prompts are sharded in chunks of ``batch_size // n`` and the samples gathered: each prompt keeps its own
    random streams, and when n divides ``batch_size`` each chunk is exactly one batch of the one-process
    run, so the samples are the same bit for bit."""
    if backend is not None:
        backend.sync_weights(model)
        rows = sample_responses(model, tokenizer, prompts, n, params, seed=seed, max_prompt_len=max_prompt_len,
                                batch_size=batch_size, backend=backend)
    elif world_size() == 1 and batch_size % n:  # chunks would not be the engine's batches: one call
        rows = sample_responses(model, tokenizer, prompts, n, params, seed=seed, max_prompt_len=max_prompt_len,
                                batch_size=batch_size)
    else:  # chunks of whole engine batches, so the samples are the one call's; a progress bar on a terminal
        chunk = max(1, batch_size // n)
        starts = range(0, len(prompts), chunk)
        parts = shard_map(lambda i: sample_responses(model, tokenizer, prompts[starts[i]:starts[i] + chunk], n, params,
                                                     seed=seed, max_prompt_len=max_prompt_len, batch_size=batch_size,
                                                     first_index=starts[i]), len(starts), f"sampling {n} per prompt",
                          items=[len(prompts[s:s + chunk]) for s in starts], unit="prompt", tokens=generated_tokens)
        rows = [row for part in parts for row in part]
    return [[SampledText(decode(tokenizer, g), g.token_ids, g.finished) for g in row] for row in rows]


def read_jsonl_examples(path: Path) -> list[RankedExample]:
    """Examples written by :func:`write_jsonl_examples` (sampled responses with their tokens again)."""
    examples = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            sampled = record["meta"].pop("sampled", None)
            if sampled:
                record["responses"] = [SampledText(r, *s) if s else r for r, s in zip(record["responses"], sampled)]
            examples.append(RankedExample(**record))
    return examples


def write_jsonl_examples(path: Path, examples: list[RankedExample]) -> None:
    def record(ex: RankedExample) -> dict:
        sampled = [[list(r.token_ids), r.finished] if isinstance(r, SampledText) else None for r in ex.responses]
        meta = {**ex.meta, "sampled": sampled} if any(sampled) else ex.meta
        return {**ex.__dict__, "meta": meta}

    atomic_write_text(path, "".join(json.dumps(record(ex)) + "\n" for ex in examples))


class OfflineSampler:
    """The task's preference data as it is (one round)."""

    name = "offline"
    stage = None
    pairs: tuple[str, ...] = ()

    def __init__(self, name: str = "offline"):
        self.name, self.rounds = name, 1

    def check(self, task: Task) -> list[RankedExample] | None:
        """Before any model exists: the task's rankings (read, so bad or filtered-out data fails here), or
        None where the task samples them from the SFT policy (they are checked once sampled)."""
        if task.samples_preferences:
            return None
        if not task.offline_preferences:
            raise ConfigError(f"sampler=offline: task '{task.name}' has no preference data of its own: train it "
                              f"with loss=sft, or draw rankings with a sampler that uses a judge (e.g. sampler=rso)")
        return task.preference_examples("train")

    def examples(self, ctx: SamplerContext, round_index: int) -> list[RankedExample]:
        task = ctx.task
        if not task.samples_preferences:
            return self.check(task)
        # Keyed by everything the content depends on: the reference, the task's settings, the seed of the
        # sampling streams, and the engine that drew them.
        key = digest(ctx.reference_key, ctx.task_config, ctx.seed, sampling_tag(ctx.backend))
        path = code_keyed(ctx.cache_dir / "preferences" / f"{task.name}-{key}.jsonl", (type(task).__module__, *SAMPLING_CODE))
        params = SamplingParams(temperature=1.0, max_new_tokens=ctx.max_response_len)

        def sample_fn(prompts, n):
            return draw(ctx.reference, ctx.tokenizer, prompts, n, params, seed=ctx.seed, backend=ctx.backend,
                        max_prompt_len=ctx.max_prompt_len)

        def load(found: Path) -> list[RankedExample]:
            log.info("preference data: read from %s", found)
            return read_jsonl_examples(found)

        def save(examples: list[RankedExample], target: Path) -> None:
            write_jsonl_examples(target, examples)
            log.info("preference data: sampled %d rankings from the SFT policy in %.1fs, cached at %s",
                     len(examples), time.time() - start, target)

        start = time.time()
        return shared_cache(path, lambda: task.preference_examples("train", sample_fn=sample_fn), save, load,
                            what="preference data")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class JudgedSampler:
    """What the samplers that sample and judge share: the judge (built on first use, from the
    ``judge`` config), sampling settings, the prompts, and a per-round ``history`` of figures."""

    name = "judged"
    stage = None
    pairs: tuple[str, ...] = ()
    """The pair strategies the method's paper uses (a warning names them when ``pairs`` is another)."""

    def __init__(self, name: str, judge: dict | None = None, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, max_new_tokens: int | None = None, batch_size: int = 64,
                 max_prompts: int | None = None, **unknown: object):
        if unknown:
            raise ValueError(f"sampler.{sorted(unknown)[0]}: not a setting of sampler '{name}'")
        self.name = name
        self.judge_config = dict(judge or {"_target_": "alignexp.judges.gold.GoldJudge", "name": "gold"})
        if "_target_" not in self.judge_config and self.judge_config.get("name") not in ("auto", "none"):
            raise ValueError(f"sampler.judge: not an option of the judge group ({self.judge_config}); choose one "
                             f"with judge@sampler.judge=<gold|reward_model|llm>")
        try:
            SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens or 1)
        except ValueError as error:
            raise ValueError(f"sampler.{error}") from None
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_new_tokens, self.batch_size, self.max_prompts = max_new_tokens, batch_size, max_prompts
        self.judge: Judge | None = None
        self.history: list[dict[str, float]] = []

    def check(self, task: Task) -> list[RankedExample] | None:
        """Before any model exists: the prompts to sample exist and the judge can be built (its folder, its
        endpoint). The rankings themselves are sampled, and checked then: None."""
        if not task.prompts("train"):
            raise NoExamples(f"sampler={self.name}: task '{task.name}' has no training prompts to sample")
        check_judge(self.judge_config, task, "sampler.judge", required=True)
        return None

    def judge_for(self, ctx: SamplerContext) -> Judge:
        if self.judge is None:
            device = str(next(ctx.policy.parameters()).device) if ctx.policy is not None else "cpu"
            judge = build_judge(self.judge_config, ctx.task, key="sampler.judge", device=device)
            if judge is None:
                raise ValueError(f"sampler.judge: sampler '{self.name}' needs a judge, and task '{ctx.task.name}' "
                                 f"has no gold reward; set judge@sampler.judge=reward_model sampler.judge.path=...")
            self.judge = judge
            log.info("%s sampler: judge %s", self.name, judge.name)
        return self.judge

    def prompts(self, ctx: SamplerContext) -> list[Text]:
        prompts = ctx.task.prompts("train")
        return prompts[:self.max_prompts] if self.max_prompts else prompts

    def sample(self, model: Any, ctx: SamplerContext, prompts: list[Text], n: int, stream: int) -> list[list[str]]:
        """n samples per prompt from ``model``; ``stream`` (a round index) picks independent random streams."""
        params = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens or ctx.max_response_len)
        base = int(digest(ctx.seed, self.name, stream), 16) % (2 ** 31)
        start = time.time()
        texts = draw(model, ctx.tokenizer, prompts, n, params, seed=base, max_prompt_len=ctx.max_prompt_len,
                     backend=ctx.backend,
                     batch_size=self.batch_size)
        log.info("%s sampler: %d x %d samples in %.1fs", self.name, len(prompts), n, time.time() - start)
        return texts

    def reference_samples(self, ctx: SamplerContext, prompts: list[Text], n: int, stream: int) -> list[list[str]]:
        """:meth:`sample` of the reference (a fixed model), cached on disk under a key of everything they
        depend on (the reference, the prompts, the seed and stream, the sampling settings, the engine), so
        the runs of a sweep that share them sample once."""
        key = digest(ctx.reference_key, list(prompts), ctx.seed, self.name, stream, n, self.temperature, self.top_k,
                     self.top_p, self.max_new_tokens or ctx.max_response_len, sampling_tag(ctx.backend))
        path = code_keyed(ctx.cache_dir / "samples" / f"{ctx.task.name}-{self.name}-{key}.jsonl",
                          (type(ctx.task).__module__, *SAMPLING_CODE))

        def compute() -> list[RankedExample]:
            rows = self.sample(ctx.reference, ctx, prompts, n, stream)
            return [RankedExample(prompt, list(row)) for prompt, row in zip(prompts, rows)]

        cached = shared_cache(path, compute, lambda value, target: write_jsonl_examples(target, value),
                              read_jsonl_examples, what=f"{self.name} samples")
        return [list(ex.responses) for ex in cached]

    def record(self, round_index: int, **figures: float) -> None:
        self.history.append({"round": round_index, **figures})
        log.info("%s sampler, round %d: %s", self.name, round_index,
                 ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))


class RSOSampler(JudgedSampler):
    """RSO (Liu et al. 2023): rejection-sampled rankings from the SFT policy (one round)."""

    name = "rso"
    pairs = ("first_round", "tournament")

    def __init__(self, name: str = "rso", num_candidates: int = 16, num_samples: int = 8, beta: float = 0.1,
                 **kwargs: object):
        super().__init__(name, **kwargs)
        if beta <= 0:
            raise ValueError(f"sampler.beta must be > 0, got {beta}")
        if not 2 <= num_samples <= num_candidates:
            raise ValueError(f"sampler.num_samples must be in [2, sampler.num_candidates = {num_candidates}], "
                             f"got {num_samples}")
        self.num_candidates, self.num_samples, self.beta = num_candidates, num_samples, beta
        self.rounds = 1

    def examples(self, ctx: SamplerContext, round_index: int) -> list[RankedExample]:
        prompts = self.prompts(ctx)
        candidates = self.reference_samples(ctx, prompts, self.num_candidates, round_index)
        judge_name, flat = on_main(lambda: (self.judge_for(ctx).name, self.judge_for(ctx).score(
            [p for p, cs in zip(prompts, candidates) for _ in cs], [c for cs in candidates for c in cs])))
        out: list[RankedExample] = []
        all_rewards: list[float] = []
        kept_rewards: list[float] = []
        for i, (prompt, cands) in enumerate(zip(prompts, candidates)):
            rewards = flat[i * self.num_candidates:(i + 1) * self.num_candidates]
            valid = [k for k, r in enumerate(rewards) if not math.isnan(r)]
            if len(valid) < self.num_samples:
                continue  # the judge abstained on too many candidates (counted by the judge)
            rng = random.Random(f"{ctx.seed}/rso/{round_index}/{i}")
            result = rejection_sample([rewards[k] for k in valid], self.num_samples, self.beta, rng)
            chosen = [valid[k] for k in result.accepted]
            all_rewards.extend(rewards[k] for k in valid)
            kept_rewards.extend(rewards[k] for k in chosen)
            out.append(ranked_example(prompt, [cands[k] for k in chosen], [rewards[k] for k in chosen], judge_name,
                                      {"source": "rso", "index": i, "sweeps": result.sweeps}))
        self.record(round_index, candidates_reward=_mean(all_rewards), accepted_reward=_mean(kept_rewards),
                    prompts=len(out))
        return out


class RaftSampler(JudgedSampler):
    """RAFT (Dong et al. 2023): the current policy's best samples, for SFT on them (``iterations`` rounds)."""

    name = "raft"

    def __init__(self, name: str = "raft", iterations: int = 3, num_candidates: int = 8,
                 selection: str = "per_prompt", top_fraction: float | None = None, **kwargs: object):
        super().__init__(name, **kwargs)
        if iterations < 1 or num_candidates < 1:
            raise ValueError(f"sampler.iterations and sampler.num_candidates must be >= 1, got {iterations}, "
                             f"{num_candidates}")
        if selection not in ("per_prompt", "global"):
            raise ValueError(f"sampler.selection must be per_prompt or global, got {selection!r}")
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise ValueError(f"sampler.top_fraction must be in (0, 1], got {top_fraction}")
        self.rounds, self.num_candidates, self.selection = iterations, num_candidates, selection
        self.top_fraction = top_fraction if top_fraction is not None else 1.0 / num_candidates

    def examples(self, ctx: SamplerContext, round_index: int) -> list[RankedExample]:
        prompts = self.prompts(ctx)
        candidates = self.sample(ctx.policy, ctx, prompts, self.num_candidates, round_index)
        ranked = on_main(lambda: self.judge_for(ctx).rank_all(prompts, candidates))
        if self.selection == "per_prompt":  # RAFT's local ranking: the best of each prompt's K samples
            kept = [(ex.prompt, ex.responses[0], ex.scores[0]) for ex in ranked]
        else:  # RAFT's global ranking: the best top_fraction of all b * K samples of the batch
            pool = [(ex.prompt, y, s) for ex in ranked for y, s in zip(ex.responses, ex.scores)]
            pool.sort(key=lambda item: -item[2])
            kept = pool[:max(1, math.ceil(self.top_fraction * len(pool)))]
        self.record(round_index, candidates_reward=_mean([s for ex in ranked for s in ex.scores]),
                    kept_reward=_mean([s for _, _, s in kept]), kept=len(kept))
        return [RankedExample(prompt=p, responses=[y], scores=[s], meta={"source": "raft", "round": round_index})
                for p, y, s in kept]


class SelfBootstrapSampler(JudgedSampler):
    """PRO's self-bootstrapping (Song et al. 2023): the task's rankings plus the current policy's samples,
    re-ranked by the judge each round."""

    name = "self_bootstrap"

    def __init__(self, name: str = "self_bootstrap", rounds: int = 2, num_new: int = 1, source: str | None = None,
                 **kwargs: object):
        super().__init__(name, **kwargs)
        if rounds < 1 or num_new < 1:
            raise ValueError(f"sampler.rounds and sampler.num_new must be >= 1, got {rounds}, {num_new}")
        self.rounds, self.num_new, self.source = rounds, num_new, source
        self._base: list[RankedExample] | None = None
        self._source_model: Any = None

    def sampling_model(self, ctx: SamplerContext) -> Any:
        """The current policy (PRO's self-bootstrapping), or the external policy in the folder ``source``
        (PRO's comparison: responses of a stronger policy added instead), loaded once."""
        if self.source is None:
            return ctx.policy
        if self._source_model is None:
            from alignexp.args import ModelArgs
            from alignexp.models.backbone import build_model

            device = next(ctx.policy.parameters()).device
            self._source_model = build_model(ModelArgs(name="source", path=str(self.source)), ctx.tokenizer,
                                             device.type).to(device).requires_grad_(False).eval()
        return self._source_model

    def check(self, task: Task) -> list[RankedExample] | None:
        """The judge and prompts (as every judged sampler), and the task's own rankings it adds samples to."""
        super().check(task)
        OfflineSampler().check(task)
        return None

    def examples(self, ctx: SamplerContext, round_index: int) -> list[RankedExample]:
        if self._base is None:
            self._base = OfflineSampler().examples(ctx, 0)
            if self.max_prompts:
                self._base = self._base[:self.max_prompts]
        prompts = [ex.prompt for ex in self._base]
        new = self.sample(self.sampling_model(ctx), ctx, prompts, self.num_new, round_index)
        ranked = on_main(lambda: self.judge_for(ctx).rank_all(
            prompts, [list(ex.responses) + ys for ex, ys in zip(self._base, new)],
            [{"source": "self_bootstrap", "index": i, "round": round_index} for i in range(len(prompts))]))
        # meta["order"][k] is the input index of the k-th ranked response: the new samples come last
        new_rewards = [s for ex, base in zip(ranked, self._base)
                       for s, index in zip(ex.scores, ex.meta["order"]) if index >= base.n]
        self.record(round_index, new_samples_reward=_mean(new_rewards),
                    ranking_reward=_mean([s for ex in ranked for s in ex.scores]), rankings=len(ranked))
        return ranked


class RelabelSampler(JudgedSampler):
    """The task's rankings, their responses re-ranked by the sampler's judge (one round): AI feedback (a
    reward model, an LLM judge) on exactly the responses that the task's own labels rank, so the two kinds
    of labels can be compared on the same data. ``history`` records how often the judge's order of a pair
    agrees with the task's."""

    name = "relabel"

    def __init__(self, name: str = "relabel", **kwargs: object):
        super().__init__(name, **kwargs)
        self.rounds = 1

    def check(self, task: Task) -> list[RankedExample] | None:
        super().check(task)
        OfflineSampler().check(task)
        return None

    def examples(self, ctx: SamplerContext, round_index: int) -> list[RankedExample]:
        base = OfflineSampler().examples(ctx, 0)
        if self.max_prompts:
            base = base[:self.max_prompts]
        ranked = on_main(lambda: self.judge_for(ctx).rank_all(
            [ex.prompt for ex in base], [list(ex.responses) for ex in base],
            [{"source": "relabel", "index": i} for i in range(len(base))]))
        agree, pairs = 0.0, 0
        for ex, original in zip(ranked, base):  # order[k]: the given (task-ranked) index of the k-th response
            position = {index: k for k, index in enumerate(ex.meta["order"])}
            for i in range(original.n):
                for j in range(i + 1, original.n):
                    if original.scores is None or original.scores[i] != original.scores[j]:
                        pairs += 1
                        agree += position[i] < position[j]
        self.record(round_index, label_agreement=agree / pairs if pairs else float("nan"), rankings=len(ranked))
        return ranked


class BestOfNSampler(JudgedSampler):
    """Best-of-N sampling of the SFT policy against a judge: an inference-time baseline, nothing is trained.

    It holds ``n`` and the selection judge (:meth:`judge_for`), and declares the ``best_of_n`` stage
    (alignexp/pipeline/evaluation.py), which evaluates best-of-``n`` instead of training, so ``examples``
    is never called, and raises if it is.
    """

    name = "best_of_n"
    stage = "best_of_n"

    def __init__(self, name: str = "best_of_n", n: int = 16, **kwargs: object):
        super().__init__(name, **kwargs)
        if n < 1:
            raise ValueError(f"sampler.n must be >= 1, got {n}")
        self.n, self.rounds = n, 1

    def examples(self, ctx: SamplerContext, round_index: int) -> list[RankedExample]:
        raise RuntimeError("sampler=best_of_n is an inference-time baseline with nothing to train: its stage "
                           "evaluates best-of-n sampling of the SFT policy instead of training")
