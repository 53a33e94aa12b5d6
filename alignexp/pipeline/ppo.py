"""The PPO stage: the policy trained online on its own samples of the task's training prompts, rewarded by
the ``ppo.judge`` (:class:`alignexp.lightning_modules.ppo.PPOModule`), through the pipeline's one ``fit``."""

from __future__ import annotations

import logging

from alignexp.args import HardwareArgs, PPOArgs
from alignexp.distributed import is_main, world_size
from alignexp.errors import ConfigError
from alignexp.inputs import check_judge
from alignexp.judges import build_judge
from alignexp.lightning_modules.ppo import PPOModule
from alignexp.pipeline.context import RunContext, register_stage
from alignexp.pipeline.fit import fit
from alignexp.scale.launch import devices_per_node

log = logging.getLogger(__name__)


def check_hardware(hw: HardwareArgs, ppo: PPOArgs) -> None:
    """PPO runs on one device or under DDP (one process per device, each a whole policy, critic, reference
    and reward): the rollouts are sampled inside the fit, rank by rank, in decode loops whose lengths depend
    on the data, which a sharded model (FSDP, DeepSpeed ZeRO) cannot run without every rank in step.
    On N processes each iteration's ``ppo.rollout_batch_size`` prompts, and each of its ``ppo.n_minibatches``
    minibatches, are split over the N ranks: each needs at least N."""
    if hw.strategy not in ("auto", None, "ddp"):
        raise ConfigError(f"hardware={hw.name}: the ppo stage runs on one device or under DDP (hardware=ddp, a "
                          f"whole copy of each model per process); strategy '{hw.strategy}' shards what it trains, "
                          f"and the rollouts, sampled inside the fit rank by rank, cannot run on sharded models. Use "
                          f"hardware=ddp, or hardware=gpu or hardware=cpu for one device")
    ranks = devices_per_node(hw) * hw.num_nodes
    smallest = ppo.rollout_batch_size // ppo.n_minibatches
    if ranks > 1 and smallest < ranks:
        raise ConfigError(f"ppo.rollout_batch_size={ppo.rollout_batch_size} with ppo.n_minibatches="
                          f"{ppo.n_minibatches} gives minibatches of {smallest} responses, fewer than the {ranks} "
                          f"processes they are split over (hardware={hw.name}); raise ppo.rollout_batch_size to "
                          f"at least {ranks * ppo.n_minibatches} or lower ppo.n_minibatches")


def check_prompts(ctx: RunContext) -> list:
    """The task's training prompts, at least ``ppo.rollout_batch_size`` of them."""
    prompts = ctx.task.prompts("train")
    if len(prompts) < ctx.args.ppo.rollout_batch_size:
        raise ConfigError(f"ppo.rollout_batch_size={ctx.args.ppo.rollout_batch_size} is more than the task's "
                          f"{len(prompts)} training prompts")
    return prompts


@register_stage("ppo", ranks="all ranks together (DDP): each iteration's prompts sharded over ranks (sampling, reward, "
                             "policy/value/reference forwards), per-token results gathered to every rank; each "
                             "minibatch split over ranks; checkpoint written by rank 0. Sharded strategies "
                             "(fsdp, deepspeed) are refused",
                check=(lambda ctx: check_hardware(ctx.hw, ctx.args.ppo), check_prompts,
                       lambda ctx: check_judge(ctx.args.ppo.judge, ctx.task, "ppo.judge", required=True)))
def ppo(ctx: RunContext) -> None:
    """PPO (KL-penalised rewards, GAE, clipped updates) on the task's training prompts, rewarded by ppo.judge."""
    args = ctx.args
    check_hardware(ctx.hw, args.ppo)
    judge = build_judge(args.ppo.judge, ctx.task, key="ppo.judge", device=ctx.hw.torch_device)
    if judge is None:
        raise ConfigError(f"ppo.judge: task '{ctx.task.name}' has no gold reward to train on; choose a reward, "
                          f"e.g. judge@ppo.judge=reward_model ppo.judge.path=<run>/reward_model")
    prompts = check_prompts(ctx)
    module = PPOModule(ctx.policy, ctx.reference, ctx.tokenizer, prompts, judge, args.ppo,
                       loss_hparams=args.loss.hparams, optim=args.train.optim,
                       max_grad_norm=args.train.gradient_clip_val or None, seed=args.seed,
                       max_prompt_len=args.model.max_prompt_len,
                       checkpoint_path=ctx.out / "checkpoints" / "ppo-last.pt")
    # ppo.resume_from, or this run's own checkpoint when the run folder is resumed (resume=<run folder>)
    resume_from = args.ppo.resume_from or (module.checkpoint_path if module.checkpoint_path.exists() else None)
    if resume_from:
        module.load_checkpoint(resume_from)
        log.info("ppo: resumed from %s at iteration %d", resume_from, module.iteration)
    loader = module.prompt_loader()
    if is_main():
        print(f"[alignexp] ppo: {args.ppo.rollout_batch_size} prompts per iteration = "
              f"{args.ppo.rollout_batch_size / world_size():g} per process x {world_size()} process(es)", flush=True)
    if len(loader) == 0:
        log.info("ppo: nothing to do (iteration %d of %d)", module.iteration, args.ppo.steps)
        return
    fit(module, loader, hw=ctx.hw, logger=args.logger, out=ctx.out, stage="ppo", max_epochs=1, log_every_n_steps=1)
