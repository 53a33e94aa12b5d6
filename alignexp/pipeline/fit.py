"""Training under the hardware group's strategy (one ``fit`` for every stage), its loggers, and the save."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from alignexp.args import HardwareArgs, TrainArgs
from alignexp.hardware import trainer_kwargs

log = logging.getLogger(__name__)


def make_loggers(logger: Mapping[str, Any], out: Path, stage: str) -> list:
    """Lightning loggers from the ``logger`` group: each entry a ``_target_`` config; its ``per_stage``
    mapping gives constructor arguments formatted with ``{stage}`` and ``{run}`` (the run folder's name),
    e.g. ``version: "{stage}"`` for the CSV logger, ``name: "{run}-{stage}"`` for wandb."""
    from hydra.utils import instantiate

    loggers = []
    for entry in logger.values():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            continue
        entry = copy.deepcopy(dict(entry))
        per_stage = {k: str(v).format(stage=stage, run=out.name) for k, v in (entry.pop("per_stage", None) or {}).items()}
        loggers.append(instantiate(entry, **per_stage))
    return loggers


def schedule(train: TrainArgs) -> dict[str, Any]:
    """The Trainer settings a ``train``-like section decides."""
    return {"max_epochs": train.max_epochs, "max_steps": train.max_steps,
            "accumulate_grad_batches": train.accumulate_grad_batches,
            "gradient_clip_val": train.gradient_clip_val or None, "log_every_n_steps": train.log_every_n_steps}


def fit(module: L.LightningModule, loader, *, hw: HardwareArgs, logger: Mapping[str, Any], out: Path, stage: str,
        **settings: Any) -> L.Trainer:
    """Train ``module`` on ``loader`` with Lightning under the hardware option's strategy; ``settings`` are
    Trainer arguments (:func:`schedule`'s, or a stage's own). Returns the Trainer."""
    trainer = L.Trainer(**trainer_kwargs(hw), logger=make_loggers(logger, out, stage), enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=str(out), num_sanity_val_steps=0,
                        **settings)
    trainer.fit(module, train_dataloaders=loader)
    # Lightning's teardown leaves the module on the CPU: sampling and evaluation run on the device again.
    module.to(hw.torch_device)
    return trainer


def save_policy(model, tokenizer, folder: Path) -> Path:
    """The policy in Hugging Face format with its tokenizer (LoRA adapters merged into full weights)."""
    from alignexp.models.lora import save_pretrained_merged

    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained_merged(model, folder)
    tokenizer.save_pretrained(folder)
    return folder
