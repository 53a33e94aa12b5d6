"""The PPO stage: the policy trained online on its own samples of the task's training prompts, rewarded by
the ``ppo.judge`` (:class:`alignexp.modules.ppo.PPOModule`), through the pipeline's one ``fit``."""

from __future__ import annotations

import logging

from alignexp.args import HardwareArgs
from alignexp.errors import ConfigError
from alignexp.inputs import check_judge
from alignexp.judges import build_judge
from alignexp.modules.ppo import PPOModule
from alignexp.pipeline.context import RunContext, register_stage
from alignexp.pipeline.fit import fit

log = logging.getLogger(__name__)


def check_one_device(hw: HardwareArgs) -> None:
    """PPO's rollouts are not sharded over ranks: refuse hardware with more than one process."""
    devices = len(hw.devices) if isinstance(hw.devices, list) else hw.devices
    if devices != 1 or hw.num_nodes != 1 or hw.strategy not in ("auto", None):
        raise ConfigError(f"hardware={hw.name}: the ppo stage runs on one device (its rollouts are not sharded "
                          f"over ranks); use hardware=gpu or hardware=cpu (devices=1, strategy=auto)")


def check_prompts(ctx: RunContext) -> list:
    """The task's training prompts, at least ``ppo.rollout_batch_size`` of them."""
    prompts = ctx.task.prompts("train")
    if len(prompts) < ctx.args.ppo.rollout_batch_size:
        raise ConfigError(f"ppo.rollout_batch_size={ctx.args.ppo.rollout_batch_size} is more than the task's "
                          f"{len(prompts)} training prompts")
    return prompts


@register_stage("ppo", ranks="one process on one device (the rollouts are not sharded; more devices are refused)",
                check=(lambda ctx: check_one_device(ctx.hw), check_prompts,
                       lambda ctx: check_judge(ctx.args.ppo.judge, ctx.task, "ppo.judge", required=True)))
def ppo(ctx: RunContext) -> None:
    """PPO (KL-penalised rewards, GAE, clipped updates) on the task's training prompts, rewarded by ppo.judge."""
    args = ctx.args
    check_one_device(ctx.hw)
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
    if len(loader) == 0:
        log.info("ppo: nothing to do (iteration %d of %d)", module.iteration, args.ppo.steps)
        return
    fit(module, loader, hw=ctx.hw, logger=args.logger, out=ctx.out, stage="ppo", max_epochs=1, log_every_n_steps=1)
