"""The run pipeline: a run is a list of stages, chosen by what the loss and the sampler declare.

``plan`` for a loss and a sampler: ``weights`` -> ``models`` -> the training stage (the sampler's
``stage`` where it declares one, e.g. best-of-N; else the loss's, from ``register_loss(..., stage=)``)
-> ``save_policy`` and ``evaluate`` after a stage that trains the policy.

How each stage runs on N processes (the stages-and-ranks contract of DESIGN.md; the processes are
launched once, before the first stage, :mod:`alignexp.scale.launch`, and every stage runs on every rank;
each stage's ``ranks`` says it again, ``python -c "import alignexp.pipeline as p; print(p.describe())"``):

==============  ==========================================================================================
stage           on N processes
==============  ==========================================================================================
weights         SFT policy cached: every rank reads it. Missing: all ranks train it together, rank 0
                writes it, holding the cache entry's lock (a concurrent job waits, then reads it)
models          every rank builds the tokenizer, the policy and the reference on its own device
preference      sampling: prompts sharded over ranks, samples gathered; judges: rank 0, verdicts
                broadcast; reference log-probs: batches sharded, gathered, cached by rank 0 under a
                lock; training: all ranks together (global batch = per-device batch x ranks x
                accumulation), the reference in CPU memory meanwhile when its log-probs are cached
reward_model    training: all ranks; held-out scoring, the save and eval.json: rank 0
ppo             DDP or one device (fsdp, deepspeed refused): each iteration's prompts sharded over ranks
                (sampling, the reward on each rank's own responses, the policy/value/reference forwards),
                per-token results gathered to every rank (rewards, GAE, whitening, KL controller over all);
                each minibatch split over ranks; rank 0 writes the checkpoint
save_policy     rank 0 writes (the fit left every rank the whole trained model); the others wait
evaluate        sampling and log-probs: prompts sharded, gathered before the metrics; judges: rank 0,
                broadcast; rank 0 writes eval.json and prints the table
best_of_n       as evaluate
==============  ==========================================================================================

Every file (config, caches, policy, eval.json, jobs.jsonl) is written once, by rank 0, behind a
barrier; nothing is repeated per rank (the task's own cheap labelling and metric arithmetic run on
every rank over the gathered data, so all ranks hold the same results and take the same path).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from alignexp.args import RunArgs
from alignexp.config import instantiate_target
from alignexp.distributed import caches_used
from alignexp.losses import get_loss
from alignexp.models.backbone import build_tokenizer
from alignexp.models.dropout import disable_dropout
from alignexp.models.lora import AdaptersOff, apply_lora
from alignexp.pipeline import evaluation, ppo, preference, reward_model  # noqa: F401  (the stages register here)
from alignexp.pipeline.context import STAGES, RunContext, Stage, get_stage, register_stage
from alignexp.pipeline.fit import save_policy
from alignexp.pipeline.weights import check_weights, ensure_sft_policy, load_model, resolve_weights
from alignexp.tasks.base import Task

log = logging.getLogger("alignexp.pipeline")

__all__ = ["STAGES", "RunContext", "Stage", "describe", "plan", "register_stage", "run"]


@register_stage("weights", ranks="cached SFT policy: every rank reads it; missing: all ranks train it, rank 0 writes "
                                "it under the cache entry's lock", check=check_weights)
def weights(ctx: RunContext) -> None:
    """Which weights the policy starts from (and the reference is): init_from, model.path, or the task's
    SFT policy (trained and cached when missing)."""
    args = ctx.args
    ctx.init = resolve_weights(args.init_from, args.model, ctx.task, ctx.spec.data != "demonstrations",
                               lambda: ensure_sft_policy(args, ctx.task))
    log.info("policy and reference: %s", ctx.init or f"{args.model.name} built from its config")


@register_stage("models", ranks="every rank builds the tokenizer, the policy and the reference on its own device")
def models(ctx: RunContext) -> None:
    """The tokenizer, the policy and the reference (a frozen copy, or the LoRA policy with its adapters off)."""
    model_args = ctx.model_args
    ctx.tokenizer = build_tokenizer(model_args)
    ctx.policy = load_model(model_args, ctx.tokenizer, ctx.hw)
    lora = model_args.lora_args
    if lora is not None:  # one set of base weights: the reference is the policy with its adapters off
        ctx.policy = apply_lora(ctx.policy, lora)
        ctx.reference = AdaptersOff(ctx.policy)
    else:
        ctx.reference = load_model(model_args, ctx.tokenizer, ctx.hw, frozen=True)
    ctx.backend = sampling_backend(ctx)
    train = ctx.args.train
    if train.disable_dropout:  # train-mode forwards without dropout noise (log-prob differences stay exact)
        switched = disable_dropout(ctx.policy, lora=not train.keep_lora_dropout)
        if switched:
            log.info("dropout: %d dropout settings of the policy set to 0 (train.disable_dropout)", switched)


def sampling_backend(ctx: RunContext):
    """What samples (``backend``): None for the HF engine on each model (the default where vLLM cannot run, and
    on several processes, whose sampling is sharded), or vLLM started from the policy's starting weights and
    given each model's weights before it samples. The choice and its reason go into eval.json."""
    from alignexp.distributed import world_size
    from alignexp.sampling.samplers import sampling_tag
    from alignexp.sampling.vllm_backend import build_backend, choose_backend

    choice = choose_backend(ctx.args.backend)
    backend = None
    if choice.name == "vllm" and world_size() > 1:
        choice = dataclasses.replace(choice, name="hf", reason=f"{choice.reason}; but {world_size()} processes "
                                                                "share the sampling, so the HF engine samples")
    elif choice.name == "vllm":
        folder = ctx.init
        if folder is None or not Path(folder).is_dir():  # vLLM starts from a folder: the built model's weights
            folder = ctx.out / ".vllm-start"
            save_policy(ctx.policy, ctx.tokenizer, folder)
        backend, choice = build_backend("vllm", ctx.policy, ctx.tokenizer.pad_token_id, model_path=folder,
                                        **ctx.args.vllm.engine_options())
    ctx.record_extra["sampling"] = {"backend": choice.name, "reason": choice.reason, "engine": sampling_tag(backend)}
    log.info("sampling: %s (%s)", choice.name, choice.reason)
    return backend


def plan(spec, sampler) -> list[str]:
    """The names of the stages a run of loss ``spec`` with ``sampler`` executes, in order."""
    main = getattr(sampler, "stage", None) or spec.stage
    names = ["weights", "models", main]
    if get_stage(main).trains_policy:
        names += ["save_policy", "evaluate"]
    return names


def describe() -> str:
    """The stage table: each registered stage, what it does, and how it runs on N processes."""
    return "\n".join(f"{s.name:<14} {s.doc}\n{'':<14} on N processes: {s.ranks}" for s in STAGES.values())


def run(args: RunArgs, task: Task) -> dict:
    """Execute the run's stages in order; returns the eval.json record."""
    spec = get_loss(args.loss.name)
    sampler = instantiate_target(args.sampler, "sampler")
    for key in args.loss.ignored:
        log.warning("loss.%s does not apply to loss '%s': ignored", key, spec.name)
    ctx = RunContext(args=args, task=task, spec=spec, sampler=sampler)
    stages = plan(spec, sampler)
    log.info("run folder: %s", args.output_dir)
    log.info("task: %s; loss: %s %s; model: %s; hardware: %s; stages: %s", task.name, spec.name, args.loss.hparams,
             args.model.name, args.hardware.name, " -> ".join(stages))
    with caches_used() as ctx.caches:  # eval.json's provenance names them
        for name in stages:
            start = time.time()
            get_stage(name).run(ctx)
            log.info("stage %s: %.1fs", name, time.time() - start)
    return ctx.record
