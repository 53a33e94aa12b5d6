"""``python -m alignexp.train``: one place builds everything, flat and in plain sight.

Stages (each logged): policy and reference -> preference data -> reference log-probs -> training ->
the trained policy in Hugging Face format -> evaluation (``eval.json`` and a printed table).
With no overrides it runs the default experiment on CPU: the synthetic task's SFT policy (trained and
cached when missing), rankings sampled from it and labelled by the gold reward, preference training
from it, and evaluation of policy against reference on held-out prompts.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from alignexp.args import EvalArgs
from alignexp.config import CONF_DIR, ConfigError, setup_runtime, validate
from alignexp.evaluation.policy import evaluate_policy
from alignexp.evaluation.results import format_table, write_eval_json
from alignexp.hardware import HardwareArgs, trainer_kwargs
from alignexp.judges.reward_model import build_reward_model, score_encoded
from alignexp.losses import get_loss
from alignexp.losses.registry import loss_kwargs
from alignexp.metrics.preference import ranking_accuracy
from alignexp.models.backbone import ModelArgs, ModelUnavailable, build_model, build_tokenizer
from alignexp.models.lora import AdaptersOff, apply_lora, lora_args, save_pretrained_merged
from alignexp.models.reference import cached_ref_logps
from alignexp.modules.datamodule import RankingDataset, encode_all, make_loader
from alignexp.modules.ppo import PPOArgs, train_ppo
from alignexp.modules.preference import OptimArgs, PreferenceModule
from alignexp.modules.reward import (
    RewardModule,
    normalise_rewards,
    ranking_labels,
    save_reward_model,
    split_heldout,
)
from alignexp.modules.sft import SFTModule
from alignexp.sampling.pairing import pairs_for_loss
from alignexp.sampling.samplers import SamplerContext, build_sampler, digest
from alignexp.tasks.base import DataError, RankedExample, truncate_rankings
from alignexp.tasks.loading import DataUnavailable

log = logging.getLogger("alignexp.train")

SFT_LOSSES = ("sft", "preferred_ft")


def make_loggers(cfg: DictConfig, out: Path, stage: str) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    loggers: list = [CSVLogger(save_dir=str(out), name="logs", version=stage)]
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=stage))
    if cfg.logger.wandb:
        loggers.append(WandbLogger(project=cfg.logger.wandb_project, save_dir=str(out), name=f"{out.name}-{stage}",
                                   offline=cfg.logger.get("wandb_offline", True)))
    return loggers


def fit(module: L.LightningModule, loader, cfg: DictConfig, section: DictConfig, out: Path, stage: str,
        hw: HardwareArgs) -> None:
    """Train ``module`` with Lightning under the hardware option's strategy."""
    trainer = L.Trainer(**trainer_kwargs(hw), max_epochs=section.max_epochs,
                        max_steps=section.get("max_steps", -1),
                        accumulate_grad_batches=section.get("accumulate_grad_batches", 1),
                        gradient_clip_val=section.get("gradient_clip_val", None) or None,
                        log_every_n_steps=cfg.train.log_every_n_steps, logger=make_loggers(cfg, out, stage),
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out),
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    # Lightning's teardown leaves the module on the CPU: sampling and evaluation run on the device again.
    module.to(hw.torch_device)


def save_policy(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained_merged(model, folder)  # LoRA adapters merged into full weights
    tokenizer.save_pretrained(folder)


def ensure_sft_policy(cfg: DictConfig, model_args: ModelArgs, tokenizer, task, hw: HardwareArgs) -> Path:
    """The task's SFT policy, trained on its demonstrations and cached; its folder is returned."""
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    for key in ("ranking_length", "skip_invalid", "n_train_prompts", "n_eval_prompts", "n_responses", "tau"):
        task_cfg.pop(key, None)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("lora", None)  # the SFT policy is trained in full; LoRA applies to the runs after it
    key = digest(model_cfg, task_cfg,
                  OmegaConf.to_container(cfg.sft, resolve=True))
    folder = Path(cfg.paths.cache_dir) / "sft" / f"{task.name}-{model_args.name}-{key}"
    if (folder / "config.json").exists():
        log.info("SFT policy: cached at %s", folder)
        return folder
    print(f"[alignexp] no SFT policy for this task and model yet: training one (cached at {folder})", flush=True)
    model = build_model(model_args, tokenizer, hw.device_type)
    examples = task.sft_examples("train")
    encoded = encode_all(tokenizer, examples, model_args.max_prompt_len, model_args.max_response_len)
    loader = make_loader(RankingDataset(encoded), cfg.sft.batch_size, tokenizer.pad_token_id, shuffle=True,
                         seed=cfg.seed)
    module = SFTModule(model, OptimArgs(lr=cfg.sft.lr, warmup_steps=cfg.train.warmup_steps))
    fit(module, loader, cfg, cfg.sft, folder.parent / f".{folder.name}-logs", "sft", hw)
    tmp = folder.with_name(folder.name + ".tmp")
    save_policy(model, tokenizer, tmp)
    tmp.replace(folder)
    return folder


def training_data(cfg: DictConfig, spec, task, sampler, ctx: SamplerContext, round_index: int, tokenizer,
                  model_args: ModelArgs, with_target: bool) -> list:
    """One round's examples, shaped for the loss (ranking length, pairs) and tokenised."""
    if spec.name == "sft":
        examples = task.sft_examples("train")
    else:
        examples = sampler.examples(ctx, round_index)
        examples = truncate_rankings(examples, cfg.task.get("ranking_length"))
        too_short = sum(ex.n < spec.min_responses for ex in examples)
        if too_short:
            log.info("%d of %d rankings have fewer than the %d responses loss '%s' needs: left out",
                     too_short, len(examples), spec.min_responses, spec.name)
            examples = [ex for ex in examples if ex.n >= spec.min_responses]
        if spec.name == "preferred_ft":
            examples = [RankedExample(ex.prompt, ex.responses[:1], None, ex.target, ex.meta) for ex in examples]
        else:
            examples = pairs_for_loss(examples, spec, cfg.pairs, rng=random.Random(cfg.seed + round_index))
    encoded = encode_all(tokenizer, examples, model_args.max_prompt_len, model_args.max_response_len, with_target)
    log.info("training data: %d examples, %s responses each", len(encoded),
             sorted({len(e.response_ids) for e in encoded}))
    return encoded


def sampler_and_context(cfg: DictConfig, task, tokenizer, model_args: ModelArgs, policy, reference,
                        init: str | None) -> tuple:
    """The ``sampler`` group's sampler and the context it samples in (policy, reference, task)."""
    sampler = build_sampler(**OmegaConf.to_container(cfg.sampler, resolve=True))
    ctx = SamplerContext(task=task, tokenizer=tokenizer, policy=policy, reference=reference,
                         reference_key=init or "", seed=cfg.seed, cache_dir=Path(cfg.paths.cache_dir),
                         max_prompt_len=model_args.max_prompt_len, max_response_len=model_args.max_response_len,
                         task_config=OmegaConf.to_container(cfg.task, resolve=True))
    return sampler, ctx


def train_reward_model(cfg: DictConfig, hparams: dict, task, tokenizer, init_args: ModelArgs, policy, reference,
                       init: str | None, optim: OptimArgs, out: Path, hw: HardwareArgs) -> dict:
    """loss=reward: a reward model trained on the sampler's rankings (a held-out share measured), normalised
    to mean 0 over the training responses, saved in HF format as <run>/reward_model."""
    sampler, ctx = sampler_and_context(cfg, task, tokenizer, init_args, policy, reference, init)
    examples = truncate_rankings(sampler.examples(ctx, 0), cfg.task.get("ranking_length"))
    train_examples, heldout = split_heldout(examples, cfg.reward_model.heldout_fraction, cfg.seed)
    train_encoded, heldout_encoded = (encode_all(tokenizer, part, init_args.max_prompt_len, init_args.max_response_len)
                                      for part in (train_examples, heldout))
    model = build_reward_model(init_args, tokenizer, hw.device_type)
    loader = make_loader(RankingDataset(train_encoded), cfg.train.batch_size, tokenizer.pad_token_id, shuffle=True,
                         seed=cfg.seed)
    start = time.time()
    fit(RewardModule(model, hparams, optim), loader, cfg, cfg.train, out, "reward", hw)
    log.info("reward model: trained on %d rankings in %.1fs", len(train_examples), time.time() - start)
    pad, batch_size = tokenizer.pad_token_id, cfg.train.batch_size
    metrics = {"reward_offset": normalise_rewards(model, train_encoded, pad, batch_size),
               "train_rankings": len(train_examples), "heldout_rankings": len(heldout)}
    if heldout:
        rows = [r.tolist() for r in score_encoded(model, heldout_encoded, pad, batch_size)]
        metrics.update(ranking_accuracy(rows, [ranking_labels(ex) for ex in heldout], prefix="heldout_accuracy"))
        if all("gold_rewards" in ex.meta for ex in heldout):  # the synthetic task's exact order too
            metrics.update(ranking_accuracy(rows, [ranking_labels(ex, "gold_rewards") for ex in heldout],
                                            prefix="heldout_gold_accuracy"))
    folder = save_reward_model(model, tokenizer, out / "reward_model")
    log.info("reward model: %s", metrics)
    print(f"[alignexp] reward model (Hugging Face format, reward_offset in config.json): {folder}", flush=True)
    if heldout:
        print(f"[alignexp] held-out ranking accuracy: {metrics['heldout_accuracy']:.3f} "
              f"± {metrics['heldout_accuracy_stderr']:.3f} over {metrics['heldout_accuracy_n_pairs']} pairs",
              flush=True)
    return write_eval_json(out / "eval.json", task=task.name, loss="reward", model=init_args.name,
                           result={"n_prompts": len(heldout), "policy": {}, "reference": {}, "comparisons": {},
                                   "reward_model": metrics}, hparams=hparams, init_from=init)


def evaluate_best_of_n(cfg: DictConfig, task, tokenizer, model_args: ModelArgs, policy, reference,
                       init: str | None, out: Path) -> dict:
    """sampler=best_of_n: nothing is trained; best-of-n sampling of the SFT policy under the sampler's judge
    is evaluated (eval.json's ``best_of_n``, at its analytic KL log n - (n - 1) / n)."""
    sampler, ctx = sampler_and_context(cfg, task, tokenizer, model_args, policy, reference, init)
    eval_args = EvalArgs.from_config(OmegaConf.to_container(cfg.eval, resolve=True),
                                     max_prompt_len=model_args.max_prompt_len,
                                     judge=cfg.sampler.judge.name, best_of_n=[sampler.n])
    result = evaluate_policy(policy, reference, tokenizer, task, eval_args, judge=sampler.judge_for(ctx))
    record = write_eval_json(out / "eval.json", task=task.name, loss="best_of_n", model=model_args.name,
                             result=result, init_from=init)
    print(format_table(result), flush=True)
    print(f"[alignexp] eval.json: {out / 'eval.json'}", flush=True)
    return record


def preference_rounds(cfg: DictConfig, spec, hparams: dict, task, tokenizer, model_args: ModelArgs, policy,
                      reference, init: str | None, optim: OptimArgs, out: Path, hw: HardwareArgs) -> None:
    """SFT and preference training: each round asks the sampler for its rankings, then trains on them."""
    # Rounds: each asks the sampler for its rankings, then trains on them (offline: one round)
    sampler, ctx = sampler_and_context(cfg, task, tokenizer, model_args, policy, reference, init)
    with_target = spec.uses_target
    for round_index in range(sampler.rounds):
        stage = "train" if sampler.rounds == 1 else f"train-round{round_index}"
        encoded = training_data(cfg, spec, task, sampler, ctx, round_index, tokenizer, model_args, with_target)
        ref_rows, frozen = None, None
        if spec.needs_reference:  # reference log-probs, once, before training
            if cfg.train.reference == "precompute":
                ref_rows = cached_ref_logps(reference, encoded, tokenizer.pad_token_id, cfg.paths.cache_dir,
                                            cfg.train.batch_size)
            else:
                frozen = reference
        if spec.name in SFT_LOSSES:
            module = SFTModule(policy, optim, loss_name=spec.name)
        else:
            module = PreferenceModule(policy, spec.name, hparams, optim, reference=frozen)
        loader = make_loader(RankingDataset(encoded, ref_rows), cfg.train.batch_size, tokenizer.pad_token_id,
                             shuffle=True, seed=cfg.seed + round_index, with_target=with_target)
        start = time.time()
        fit(module, loader, cfg, cfg.train, out, stage, hw)
        log.info("%s: %.1fs", stage, time.time() - start)


def run(cfg: DictConfig) -> dict:
    """The whole experiment for a composed, validated config; returns the eval.json record."""
    hw = HardwareArgs(**cfg.hardware)
    setup_runtime(cfg.seed, hw.threads)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    model_args = ModelArgs(**OmegaConf.to_container(cfg.model, resolve=True))
    spec = get_loss(cfg.loss.name)
    hparams, ignored = loss_kwargs(spec.name, OmegaConf.to_container(cfg.loss, resolve=True))
    for key in ignored:
        log.warning("loss.%s does not apply to loss '%s': ignored", key, spec.name)
    log.info("run folder: %s", out)

    tokenizer = build_tokenizer(model_args)
    task = instantiate(cfg.task)
    log.info("task: %s; loss: %s %s; model: %s; hardware: %s", task.name, spec.name, hparams, model_args.name, hw.name)

    # Policy init and reference: init_from, else the task's SFT policy where the task trains one.
    if cfg.init_from:
        init = str(cfg.init_from)
    elif getattr(task, "has_gold_reward", False) and model_args.path is None and spec.name != "sft":
        init = str(ensure_sft_policy(cfg, model_args, tokenizer, task, hw))
    else:
        init = model_args.path
    init_args = ModelArgs(**{**model_args.__dict__, "path": init})
    if init is not None:
        tokenizer = build_tokenizer(init_args)
    policy = build_model(init_args, tokenizer, hw.device_type)
    lora = lora_args(model_args.lora)
    if lora is not None:  # the reference is the policy with its adapters off: one set of base weights
        policy = apply_lora(policy, lora)
        reference = AdaptersOff(policy)
    else:
        reference = build_model(init_args, tokenizer, hw.device_type).requires_grad_(False).eval()
    # Sampling, reference log-probs and evaluation run outside Lightning, on the hardware's device.
    policy.to(hw.torch_device)
    reference.to(hw.torch_device)
    log.info("policy and reference: %s", init or f"{model_args.name} built from its config")

    optim = OptimArgs(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, warmup_steps=cfg.train.warmup_steps)
    if spec.name == "reward":  # a reward model, not a policy (alignexp/modules/reward.py)
        return train_reward_model(cfg, hparams, task, tokenizer, init_args, policy, reference, init, optim, out, hw)
    if cfg.sampler.name == "best_of_n":  # an inference-time baseline: nothing is trained
        return evaluate_best_of_n(cfg, task, tokenizer, model_args, policy, reference, init, out)
    start = time.time()
    if spec.name == "ppo":  # online RL on the policy's own samples instead of preference rounds
        train_ppo(policy, reference, tokenizer, task, PPOArgs.from_hparams(hparams), out,
                  {**trainer_kwargs(hw), "logger": make_loggers(cfg, out, "ppo")}, optim=optim,
                  max_grad_norm=cfg.train.gradient_clip_val or None, seed=cfg.seed,
                  max_prompt_len=model_args.max_prompt_len)
    else:
        preference_rounds(cfg, spec, hparams, task, tokenizer, model_args, policy, reference, init, optim, out, hw)
    log.info("training: %.1fs", time.time() - start)
    save_policy(policy, tokenizer, out / "policy")
    print(f"[alignexp] trained policy (Hugging Face format): {out / 'policy'}", flush=True)

    # Evaluation
    record = {"task": task.name, "loss": spec.name, "model": model_args.name}
    if cfg.eval.enabled:
        eval_args = EvalArgs.from_config(OmegaConf.to_container(cfg.eval, resolve=True),
                                         max_prompt_len=model_args.max_prompt_len,
                                         beta=float(hparams.get("beta", 1.0)))
        result = evaluate_policy(policy, reference, tokenizer, task, eval_args,
                                 max_response_len=model_args.max_response_len)
        record = write_eval_json(out / "eval.json", task=task.name, loss=spec.name, model=model_args.name,
                                 result=result, hparams=hparams, init_from=init)
        print(format_table(result), flush=True)
        print(f"[alignexp] eval.json: {out / 'eval.json'}", flush=True)
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        validate(cfg)
        record = run(cfg)
    except (ConfigError, ModelUnavailable, DataUnavailable, DataError) as error:  # clear, user-facing failures
        kind = "config error" if isinstance(error, ConfigError) else "error"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a failed job is recorded (jobs.jsonl) and the sweep's other jobs still run
        print(f"{kind}: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    policy = record.get("policy", {})
    return policy.get("gold_reward")


if __name__ == "__main__":
    main()
