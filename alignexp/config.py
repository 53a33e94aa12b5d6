"""From the composed config to typed, checked arguments, in the first second of a run.

:func:`validate` turns a composed ``DictConfig`` into :class:`~alignexp.args.RunArgs` (the entry
points are the only code that sees a ``DictConfig``); every bad key or value raises
:class:`~alignexp.errors.ConfigError` naming it. :func:`~alignexp.conf_dir` finds the config tree,
:func:`import_user_modules` imports a user's own losses, stages, tasks, samplers and judges
(``imports: [my_pkg.losses]``) before any registry is read.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignexp import conf_dir
from alignexp.args import (
    EvalArgs,
    HardwareArgs,
    LossArgs,
    ModelArgs,
    PPOArgs,
    RewardModelArgs,
    RunArgs,
    SFTArgs,
    TrainArgs,
    VllmArgs,
    from_mapping,
    instantiate_target,
)
from alignexp.errors import ConfigError
from alignexp.files import register_user_modules
from alignexp.losses import get_loss
from alignexp.losses.registry import check_hparams, loss_kwargs

__all__ = ["CONF_DIR", "ConfigError", "conf_dir", "import_user_modules", "setup_runtime", "validate"]


CONF_DIR = conf_dir()


def import_user_modules(names: list[str] | None) -> None:
    """Import each module of ``imports`` (a user's ``@register_loss`` / ``@register_stage`` code, or the
    module of a ``_target_``), so that what it registers exists before the registries are read."""
    for name in names or []:
        try:
            importlib.import_module(str(name))
        except ImportError as error:
            raise ConfigError(f"imports: cannot import {name!r} ({error}); the module must be installed, on "
                              f"PYTHONPATH, or in the working folder (under `python -m`)") from None
    register_user_modules([str(name) for name in names or []])  # their source keys every cache entry


def _section(container: dict, key: str) -> dict:
    value = container.get(key)
    return dict(value) if isinstance(value, Mapping) else {}


def validate(cfg: DictConfig) -> RunArgs:
    """The run's typed arguments; raises :class:`ConfigError` for a missing value, an unknown loss,
    hyper-parameter, sampler or key, or a value out of range."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}")
    container = OmegaConf.to_container(cfg, resolve=True)
    import_user_modules(container.get("imports"))
    loss = _section(container, "loss")
    name = str(loss.pop("name", None))
    try:
        get_loss(name)
    except KeyError as error:  # its YAML composed (conf/loss/<name>.yaml was found), so only the code is missing
        raise ConfigError(f"loss.name: {error.args[0]}. A config names loss '{name}' but no imported module "
                          f"registers it: add imports=[<your module>] (the module with @register_loss(\"{name}\")), "
                          f"importable from the working folder or PYTHONPATH") from None
    try:
        check_hparams(name, loss)
    except (KeyError, ValueError) as error:
        message = str(error.args[0])
        raise ConfigError(message if message.startswith("loss.") else f"loss.name: {message}") from None
    hparams, ignored = loss_kwargs(name, loss)
    model = from_mapping(ModelArgs, _section(container, "model"), "model")
    paths = _section(container, "paths")
    model = resolve_model_source(model, paths.get("cache_dir", ".cache/alignexp"))
    args = RunArgs(
        model=model,
        hardware=from_mapping(HardwareArgs, _section(container, "hardware"), "hardware"),
        loss=LossArgs(name, hparams, ignored),
        train=from_mapping(TrainArgs, _section(container, "train"), "train"),
        sft=from_mapping(SFTArgs, _section(container, "sft"), "sft"),
        eval=from_mapping(EvalArgs, _section(container, "eval"), "eval", max_prompt_len=model.max_prompt_len,
                          beta=float(hparams.get("beta", 1.0))),
        ppo=from_mapping(PPOArgs, _section(container, "ppo"), "ppo"),
        reward_model=from_mapping(RewardModelArgs, _section(container, "reward_model"), "reward_model"),
        task=_section(container, "task"),
        sampler=_section(container, "sampler"),
        judge=_section(container, "judge") or {"name": "auto"},
        logger=_section(container, "logger"),
        output_dir=paths.get("output_dir", "."),
        cache_dir=paths.get("cache_dir", ".cache/alignexp"),
        seed=container.get("seed", 0),
        pairs=container.get("pairs", "best_worst"),
        binary=container.get("binary", "best"),
        init_from=container.get("init_from"),
        run_name=str(container.get("run_name") or name),
        backend=str(container.get("backend", "auto")),
        vllm=from_mapping(VllmArgs, _section(container, "vllm"), "vllm"),
        imports=list(container.get("imports") or []),
        resume=container.get("resume"),
    )
    instantiate_target(args.sampler, "sampler")  # a sampler checks its settings when it is built
    from alignexp.tasks.base import check_ranking_length

    check_ranking_length(args.task.get("ranking_length"))
    return args


def resolve_model_source(model: ModelArgs, cache_dir: str) -> ModelArgs:
    """``model.path`` (a hub id) where the hub is reachable, else the built offline asset ``model.asset``; the
    choice is logged (and an error says how to get either when neither is there)."""
    if not model.asset:
        return model
    from alignexp.assets import choose_source

    # Neither there: the hub id stays, and the run's preflight refuses it saying how to get either.
    source = choose_source(model.path, model.asset, cache_dir, key="model.path", strict=False)
    logging.getLogger("alignexp.model").info("model %s: %s (%s)", model.name, source.path, source.reason)
    return model.with_path(source.path)


def build_task(config: Mapping[str, Any]):
    """The task of the ``task`` group (its ``_target_``), its settings checked by its constructor."""
    return instantiate_target(config, "task")


def setup_runtime(seed: int, threads: int | None, verbose: bool = False) -> None:
    """Seeds, thread counts and what libraries print (:func:`alignexp.logs.quiet_libraries`; ``verbose``:
    everything), set explicitly by the entry point (never at import)."""
    import torch

    from alignexp.logs import quiet_libraries

    quiet_libraries(verbose)

    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
