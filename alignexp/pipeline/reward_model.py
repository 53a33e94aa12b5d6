"""The reward-model stage: a scalar-head model trained on the sampler's rankings (Bradley-Terry on pairs,
Plackett-Luce on rankings), its held-out ranking accuracy measured, normalised, saved as <run>/reward_model."""

from __future__ import annotations

import logging
import time

from alignexp.distributed import barrier, on_main
from alignexp.evaluation.results import write_eval_json
from alignexp.judges.reward_model import build_reward_model, score_encoded
from alignexp.lightning_modules.datamodule import RankingDataset, encode_all, make_loader
from alignexp.lightning_modules.reward import (
    RewardModule,
    normalise_rewards,
    ranking_labels,
    save_reward_model,
    split_heldout,
)
from alignexp.metrics.preference import ranking_accuracy
from alignexp.models.dropout import disable_dropout
from alignexp.pipeline.context import RunContext, register_stage
from alignexp.pipeline.fit import fit, global_batch_size, schedule
from alignexp.pipeline.preference import check_training_data, sampler_context, shape_for_loss
from alignexp.provenance import provenance

log = logging.getLogger(__name__)


@register_stage("reward_model", trains_policy=False, check=check_training_data,
                ranks="all ranks train together; the held-out scoring, the save and eval.json on rank 0")
def reward_model(ctx: RunContext) -> None:
    """Train, measure and save a reward model from the rankings (eval.json's ``reward_model``)."""
    args, tokenizer = ctx.args, ctx.tokenizer
    examples = shape_for_loss(ctx, ctx.sampler.examples(sampler_context(ctx), 0), 0)
    train_examples, heldout = split_heldout(examples, args.reward_model.heldout_fraction, args.seed)
    model_args = ctx.model_args
    train_encoded, heldout_encoded = (encode_all(tokenizer, part, model_args.max_prompt_len,
                                                 model_args.max_response_len) for part in (train_examples, heldout))
    model = build_reward_model(model_args, tokenizer, ctx.hw.device_type)
    if args.train.disable_dropout:
        disable_dropout(model)
    loader = make_loader(RankingDataset(train_encoded), args.train.batch_size, tokenizer.pad_token_id, shuffle=True,
                         seed=args.seed)
    start = time.time()
    module = RewardModule(model, args.loss.hparams, args.train.optim)
    settings = schedule(args.train)
    fit(module, loader, hw=ctx.hw, logger=args.logger, out=ctx.out, stage="reward",
        checkpoint_every=args.train.checkpoint_every, **settings)
    log.info("reward model: trained on %d rankings in %.1fs", len(train_examples), time.time() - start)
    extra = {"global_batch_size": global_batch_size(loader, settings["accumulate_grad_batches"])}
    ctx.record = on_main(lambda: measure_and_save(ctx, module.policy, train_encoded, heldout, heldout_encoded, extra))
    barrier()


def measure_and_save(ctx: RunContext, model, train_encoded: list, heldout: list, heldout_encoded: list,
                     extra: dict) -> dict:
    """The trained reward model's held-out accuracy, its normalisation, the save and eval.json (rank 0)."""
    args, tokenizer, model_args = ctx.args, ctx.tokenizer, ctx.model_args
    pad, batch_size = tokenizer.pad_token_id, args.train.batch_size
    metrics = {"reward_offset": normalise_rewards(model, train_encoded, pad, batch_size),
               "train_rankings": len(train_encoded), "heldout_rankings": len(heldout)}
    if heldout:
        rows = [r.tolist() for r in score_encoded(model, heldout_encoded, pad, batch_size)]
        metrics.update(ranking_accuracy(rows, [ranking_labels(ex) for ex in heldout], prefix="heldout_accuracy"))
        if all("gold_rewards" in ex.meta for ex in heldout):  # the synthetic task's exact order too
            metrics.update(ranking_accuracy(rows, [ranking_labels(ex, "gold_rewards") for ex in heldout],
                                            prefix="heldout_gold_accuracy"))
    folder = save_reward_model(model, tokenizer, ctx.out / "reward_model")
    log.info("reward model: %s", metrics)
    print(f"[alignexp] reward model (Hugging Face format, reward_offset in config.json): {folder}", flush=True)
    if heldout:
        print(f"[alignexp] held-out ranking accuracy: {metrics['heldout_accuracy']:.3f} "
              f"± {metrics['heldout_accuracy_stderr']:.3f} over {metrics['heldout_accuracy_n_pairs']} pairs",
              flush=True)
    return write_eval_json(ctx.out / "eval.json", task=ctx.task.name, loss=ctx.spec.name,
                           model=model_args.name, result={"n_prompts": len(heldout), "policy": {},
                                                          "reference": {}, "comparisons": {},
                                                          "reward_model": metrics},
                           hparams=args.loss.hparams, init_from=ctx.init, **extra,
                           provenance=provenance({f"{p.parent.name}/{p.name}": str(p) for p in ctx.caches}))
