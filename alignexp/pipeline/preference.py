"""The preference stage: each round asks the sampler for rankings, shapes them for the loss, precomputes
the reference's log-probs, and trains the policy on them (SFT, Preferred-FT, RAFT and every preference loss)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from alignexp.errors import AlignexpError, ConfigError
from alignexp.inputs import in_context
from alignexp.lightning_modules.datamodule import RankingDataset, encode_all, make_loader
from alignexp.lightning_modules.preference import PreferenceModule
from alignexp.models.lora import AdaptersOff
from alignexp.models.reference import cached_ref_logps
from alignexp.pipeline.context import RunContext, register_stage
from alignexp.pipeline.fit import fit, global_batch_size, schedule
from alignexp.sampling.pairing import check_scores, pairs_for_loss
from alignexp.sampling.samplers import SamplerContext
from alignexp.tasks.base import RankedExample, binary_feedback, truncate_rankings, with_mismatched_responses
from alignexp.tasks.loading import NoExamples

log = logging.getLogger(__name__)


def sampler_context(ctx: RunContext) -> SamplerContext:
    """What the run's sampler may use: the policy being trained, the reference, the task, the caches."""
    args = ctx.args
    return SamplerContext(task=ctx.task, tokenizer=ctx.tokenizer, policy=ctx.policy, reference=ctx.reference,
                          reference_key=ctx.init or "", seed=args.seed, cache_dir=args.cache_dir,
                          max_prompt_len=args.model.max_prompt_len, max_response_len=args.model.max_response_len,
                          task_config=args.task, backend=ctx.backend)


def data_mismatch(spec, feedback: str) -> ConfigError:
    """The error for a loss given data it does not read (binary feedback for a loss on rankings)."""
    return ConfigError(f"loss={spec.name} trains on {spec.data} and the task's preference data is {feedback} "
                       "feedback (one response each, desirable or not): train it with a loss that reads binary "
                       "feedback (loss=kto), or give rankings or pairs")


def shape_binary(ctx: RunContext, examples: list[RankedExample], round_index: int) -> list[RankedExample]:
    """Binary feedback for a loss that reads it (KTO): rankings turned into it by the run's ``binary`` rule
    (:func:`alignexp.tasks.base.binary_feedback`), then each example packed with its mismatched response
    (another prompt's), whose log-probs under this prompt give the KL reference point. Those are one more
    response per example in the same forward pass (and in the reference's precomputed log-probs), so the
    reference point costs one extra response's tokens per example, never a second pass."""
    examples = binary_feedback(truncate_rankings(examples, ctx.task.ranking_length), ctx.args.binary)
    desirable = sum(bool(ex.label) for ex in examples)
    log.info("binary feedback for loss '%s': %d examples, %d desirable, %d undesirable (binary=%s)",
             ctx.spec.name, len(examples), desirable, len(examples) - desirable, ctx.args.binary)
    if not examples:
        raise NoExamples(f"training data for loss '{ctx.spec.name}': no binary feedback")
    return with_mismatched_responses(examples, random.Random(ctx.args.seed + round_index))


def shape_for_loss(ctx: RunContext, examples: list[RankedExample], round_index: int) -> list[RankedExample]:
    """Rankings as the loss declares it reads them: cut to ``task.ranking_length``, too-short ones counted
    and left out, then the best response alone (``data="best"``) or pairs for a pairwise loss; binary
    feedback for a loss that reads it (:func:`shape_binary`). Binary feedback for any other loss is refused."""
    spec = ctx.spec
    if spec.data == "binary":
        return shape_binary(ctx, examples, round_index)
    if any(ex.label is not None for ex in examples):
        raise data_mismatch(spec, "binary")
    read = len(examples)
    examples = truncate_rankings(examples, ctx.task.ranking_length)
    too_short = sum(ex.n < spec.min_responses for ex in examples)
    if too_short:
        log.info("%d of %d rankings have fewer than the %d responses loss '%s' needs: left out",
                 too_short, len(examples), spec.min_responses, spec.name)
        examples = [ex for ex in examples if ex.n >= spec.min_responses]
    if spec.data == "best":
        shaped = [RankedExample(ex.prompt, ex.responses[:1], None, ex.target, ex.meta) for ex in examples]
    else:
        check_scores(examples, spec)
        shaped = pairs_for_loss(examples, spec, ctx.args.pairs, rng=random.Random(ctx.args.seed + round_index))
    if not shaped:  # zero examples is an error naming each filter, never an empty epoch
        tied = f"; {len(examples)} give no pair under pairs={ctx.args.pairs} (their responses tie)" if examples else ""
        raise NoExamples(f"training data for loss '{spec.name}': {read} rankings, none left: {too_short} have fewer "
                         f"than the {spec.min_responses} responses it needs (task.ranking_length="
                         f"{ctx.task.ranking_length}){tied}")
    return shaped


def check_training_data(ctx: RunContext) -> None:
    """Before any model is built: the examples the loss will train on exist, where they exist before
    sampling (the task's demonstrations or rankings, shaped for the loss; the sampler's prompts and judge)."""
    if ctx.spec.data == "demonstrations":
        if not ctx.task.sft_examples("train"):  # a record task raises NoExamples itself, naming its filters
            raise NoExamples(f"loss={ctx.spec.name}: task '{ctx.task.name}' has no SFT demonstrations")
        return
    feedback = getattr(ctx.task, "feedback", "rankings")  # what a task that samples its data will give
    if feedback == "binary" and ctx.spec.data != "binary":
        raise in_context(data_mismatch(ctx.spec, feedback), f"training data (stage {ctx.spec.stage})")
    try:
        examples = ctx.sampler.check(ctx.task) if hasattr(ctx.sampler, "check") else None
        if examples is not None:
            shape_for_loss(ctx, examples, 0)
    except AlignexpError as error:
        raise in_context(error, f"training data (stage {ctx.spec.stage})") from None


def pairs_warning(sampler, spec, pairs: str) -> str | None:
    """A warning when a pairwise loss gets pairs other than those the sampler's method is paired with."""
    if not sampler.pairs or spec.listwise or spec.min_responses < 2 or pairs in sampler.pairs:
        return None
    return (f"pairs={pairs}: sampler '{sampler.name}' is meant to be paired with "
            f"{' or '.join(f'pairs={p}' for p in sampler.pairs)} (its paper's strategies)")


def training_data(ctx: RunContext, sampler_ctx: SamplerContext, round_index: int) -> list:
    """One round's examples, shaped for the loss and tokenised."""
    if ctx.spec.data == "demonstrations":
        examples = ctx.task.sft_examples("train")
    else:
        examples = shape_for_loss(ctx, ctx.sampler.examples(sampler_ctx, round_index), round_index)
    model = ctx.args.model
    encoded = encode_all(ctx.tokenizer, examples, model.max_prompt_len, model.max_response_len, ctx.spec.uses_target)
    log.info("training data: %d examples, %s responses each", len(encoded),
             sorted({len(e.response_ids) for e in encoded}))
    return encoded


def adopt_trained(ctx: RunContext, module) -> None:
    """The context's models are the trained module's (plain again after a sharded fit): the policy, a frozen
    reference trained beside it, or the LoRA policy with its adapters off."""
    ctx.policy = module.policy
    if isinstance(ctx.reference, AdaptersOff):
        ctx.reference = AdaptersOff(ctx.policy)
    elif getattr(module, "reference", None) is not None:
        ctx.reference = module.reference


@contextmanager
def reference_off_device(ctx: RunContext, needed: bool) -> Iterator[None]:
    """The reference model moved to CPU memory for the block when training does not need it (its log-probs
    are precomputed, and it is not the LoRA policy itself), and back on this rank's device afterwards."""
    parked = not needed and not isinstance(ctx.reference, AdaptersOff) and ctx.hw.device_type == "cuda"
    if parked:
        ctx.reference.to("cpu")
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if parked:
            ctx.reference.to(ctx.hw.torch_device)


@register_stage("preference", ranks="sampling: prompts sharded over ranks, samples gathered; judge: rank 0, "
                                   "broadcast; reference log-probs: batches sharded, gathered, cached by rank 0; "
                                   "training: all ranks together (global batch = batch_size x ranks x accumulation)",
                check=check_training_data)
def preference(ctx: RunContext) -> None:
    """Rounds of sampling and training: the sampler's rankings (one round offline), the loss on them."""
    args, spec = ctx.args, ctx.spec
    warning = pairs_warning(ctx.sampler, spec, args.pairs)
    if warning:
        log.warning(warning)
    rounds = ctx.sampler.rounds
    for round_index in range(rounds):
        stage = "train" if rounds == 1 else f"train-round{round_index}"
        encoded = training_data(ctx, sampler_context(ctx), round_index)
        ref_rows, frozen = None, None
        if spec.needs_reference:  # the reference's log-probs, once, before training
            if args.train.reference == "precompute":
                ref_rows = cached_ref_logps(ctx.reference, encoded, ctx.tokenizer.pad_token_id, args.cache_dir,
                                            args.train.batch_size)
            else:
                frozen = ctx.reference
        module = PreferenceModule(ctx.policy, spec.name, args.loss.hparams, args.train.optim, reference=frozen)
        loader = make_loader(RankingDataset(encoded, ref_rows), args.train.batch_size, ctx.tokenizer.pad_token_id,
                             shuffle=True, seed=args.seed + round_index, with_target=spec.uses_target)
        settings = schedule(args.train)
        ctx.record_extra["global_batch_size"] = global_batch_size(loader, settings["accumulate_grad_batches"])
        start = time.time()
        with reference_off_device(ctx, needed=frozen is not None):
            fit(module, loader, hw=ctx.hw, logger=args.logger, out=ctx.out, stage=stage,
                checkpoint_every=args.train.checkpoint_every, **settings)
        adopt_trained(ctx, module)
        log.info("%s: %.1fs", stage, time.time() - start)
