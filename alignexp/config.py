"""Validation of the composed config, in the first second of a run, with messages that name the key."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from alignexp.hardware import HardwareArgs
from alignexp.losses import get_loss
from alignexp.losses.registry import check_hparams
from alignexp.models.backbone import ModelArgs
from alignexp.models.lora import lora_args

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""The config tree (``conf/`` at the repository root), given to Hydra as an absolute path."""

PAIR_STRATEGIES = ("best_worst", "adjacent", "all", "first_round", "tournament")


class ConfigError(ValueError):
    """A bad value or key in the composed config; the message names the key."""


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for missing keys, unknown loss names or hyper-parameters, bad values."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}")
    loss = dict(cfg.loss)
    name = loss.pop("name", None)
    try:
        get_loss(str(name))
    except KeyError as error:
        raise ConfigError(f"loss.name: {error.args[0]}") from None
    try:
        check_hparams(str(name), loss)
    except (KeyError, ValueError) as error:
        raise ConfigError(str(error.args[0])) from None
    if name == "ppo":  # its settings are checked as a whole (ranges, and how they combine)
        from alignexp.modules.ppo import PPOArgs

        try:
            PPOArgs.from_hparams(loss)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    try:
        HardwareArgs(**OmegaConf.to_container(cfg.hardware, resolve=True))
        lora_args(OmegaConf.to_container(cfg.model.lora, resolve=True) if cfg.model.get("lora") else None)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
    from alignexp.evaluate import EvalArgs  # evaluate imports this module

    try:
        EvalArgs.from_config(OmegaConf.to_container(cfg.eval, resolve=True))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(cfg.model) - known)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    if cfg.get("pairs") not in PAIR_STRATEGIES:
        raise ConfigError(f"pairs must be one of {', '.join(PAIR_STRATEGIES)}, got {cfg.get('pairs')!r}")
    for key in ("train.batch_size", "train.lr", "train.max_epochs", "train.accumulate_grad_batches",
                "sft.batch_size", "sft.lr", "sft.max_epochs", "eval.max_new_tokens", "eval.batch_size"):
        _positive(cfg, key)
    for key in ("train.weight_decay", "train.warmup_steps", "train.gradient_clip_val"):
        _positive(cfg, key, allow_zero=True)
    ranking_length = OmegaConf.select(cfg, "task.ranking_length")
    if ranking_length is not None and (not isinstance(ranking_length, int) or ranking_length < 2):
        raise ConfigError(f"task.ranking_length must be an integer >= 2 (or null), got {ranking_length!r}")
    for t in OmegaConf.select(cfg, "eval.temperatures") or []:
        if not isinstance(t, (int, float)) or t < 0:
            raise ConfigError(f"eval.temperatures must be numbers >= 0, got {t!r}")
    if cfg.train.reference not in ("precompute", "frozen"):
        raise ConfigError(f"train.reference must be 'precompute' or 'frozen', got {cfg.train.reference!r}")


def setup_runtime(seed: int, threads: int | None) -> None:
    """Seeds and thread counts, set explicitly by the entry point (never at import)."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
