"""Training under the hardware group's strategy (one ``fit`` for every stage), its checkpoints and resume,
its loggers, and the save.

:func:`fit` is the one way a stage trains, on all ranks together: the global batch is printed;
checkpoints go to ``<folder>/checkpoints/<stage>/`` every ``train.checkpoint_every`` optimizer steps
(``last.ckpt``) and at a SLURM preemption signal (:class:`Preemption`), each marked complete once every
rank has written it (:func:`complete_marked`: DeepSpeed and FSDP2 write folders of shards that no atomic
rename covers); the newest complete one there is resumed from, data order included
(:class:`~alignexp.lightning_modules.datamodule.EpochBatches`), so a run killed and restarted in its folder
ends with the weights of an uninterrupted run. Afterwards the module's models are plain modules with
their trained weights on every rank, whatever the strategy sharded.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from alignexp.args import HardwareArgs, TrainArgs
from alignexp.distributed import barrier, is_main, world_size
from alignexp.errors import AlignexpError, ConfigError
from alignexp.files import atomic_write, atomic_write_json
from alignexp.scale.hardware import master_weights, trainer_kwargs

log = logging.getLogger(__name__)


def make_loggers(logger: Mapping[str, Any], out: Path, stage: str) -> list:
    """Lightning loggers from the ``logger`` group: each entry a ``_target_`` config; its ``per_stage``
    mapping gives constructor arguments formatted with ``{stage}`` and ``{run}`` (the run folder's name),
    e.g. ``version: "{stage}"`` for the CSV logger, ``name: "{run}-{stage}"`` for wandb."""
    loggers = []
    for entry in logger.values():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            continue
        from hydra.utils import instantiate  # only here: no logger, no Hydra (the GPU check runs without it)

        entry = copy.deepcopy(dict(entry))
        per_stage = {k: str(v).format(stage=stage, run=out.name) for k, v in (entry.pop("per_stage", None) or {}).items()}
        loggers.append(instantiate(entry, **per_stage))
    return loggers


def accumulation(train: TrainArgs, batch_size: int | None = None) -> int:
    """``accumulate_grad_batches``: ``train.global_batch_size / (batch_size x ranks)`` where a global batch
    is asked for (it must divide), else ``train.accumulate_grad_batches``."""
    batch_size = batch_size or train.batch_size
    if train.global_batch_size is None:
        return train.accumulate_grad_batches
    per_step = batch_size * world_size()
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not a multiple of train.batch_size "
                          f"x processes = {batch_size} x {world_size()} = {per_step}")
    return train.global_batch_size // per_step


def schedule(train: TrainArgs) -> dict[str, Any]:
    """The Trainer settings a ``train``-like section decides."""
    return {"max_epochs": train.max_epochs, "max_steps": train.max_steps,
            "accumulate_grad_batches": accumulation(train),
            "gradient_clip_val": train.gradient_clip_val or None, "log_every_n_steps": train.log_every_n_steps}


def global_batch_size(loader, accumulate: int) -> int | None:
    """Examples per optimizer step over all ranks: per-device batch x ranks x accumulation (None for a loader
    without a fixed batch size, e.g. PPO's rollouts)."""
    batch = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return batch * world_size() * accumulate if batch else None


class AtomicCheckpointIO(L.pytorch.plugins.TorchCheckpointIO):
    """Lightning's checkpoint file written under a unique temporary name and renamed, so a process killed
    while saving leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class DataPosition(L.Callback):
    """Tells the loader's :class:`~alignexp.lightning_modules.datamodule.EpochBatches` how many batches of the epoch
    were trained on, before a checkpoint saves it (checkpoint callbacks run last)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "position"):
            sampler.position = batch_idx + 1


class Preempted(AlignexpError):
    """Training stopped at a preemption signal after saving its checkpoint (the run is requeued, or resumable)."""


def _is_lightnings(handler: Any) -> bool:
    """Whether a signal handler is Lightning's (its SLURM auto-requeue, ``_SignalConnector``)."""
    owner = getattr(handler, "__self__", handler)
    return type(owner).__module__.startswith(("lightning.", "pytorch_lightning."))


class Preemption(L.Callback):
    """A scheduler's warning before it stops the job (SLURM: ``#SBATCH --signal=USR1@120``, or submitit's
    USR2): the ranks agree at the next step boundary, save ``last.ckpt`` and stop; then the job is handed
    back: to the handler that was there (submitit requeues), or ``scontrol requeue`` on SLURM, and the
    run ends with :class:`Preempted`. A requeued run resumes from the checkpoint (its run folder must be
    the same: ``hydra.run.dir=outputs/${oc.env:SLURM_JOB_ID}``, docs/scale.md)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, path: Path):
        self.path, self.received, self.saved = path, None, False
        self.previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

    def _note(self, signum: int, frame) -> None:
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            trainer.save_checkpoint(self.path)
            self.saved, trainer.should_stop = True, True

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def hand_over(self) -> None:
        """After the fit: requeue the job (the previous handler, or ``scontrol requeue`` by rank 0) and stop."""
        handler = self.previous.get(self.received or signal.SIGUSR1)
        if callable(handler) and not _is_lightnings(handler):  # Lightning's SLURM requeue would save again
            handler(self.received, None)
        elif is_main() and "SLURM_JOB_ID" in os.environ:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            subprocess.call(["scontrol", "requeue", job])
        raise Preempted(f"stopped at signal {self.received}: checkpoint {self.path}; the run continues from it "
                        f"when requeued or resumed (resume=<run folder>)")


class FinalCheckpoint(L.Callback):
    """``last.ckpt`` once more when training ends: a resumed run then finds this stage finished."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)


def progress_bar(stage: str) -> L.Callback:
    """Lightning's own progress bar (Rich where it imports, else tqdm: steps, rate, ETA) titled with the stage,
    without the logger's version number (``v_num``), which names nothing a reader needs."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    class StageProgressBar(RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar):
        def get_metrics(self, trainer, pl_module):
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

        def _get_train_description(self, current_epoch: int) -> str:  # Rich's title of the bar
            return f"{stage} · {super()._get_train_description(current_epoch)}"

        def on_train_epoch_start(self, trainer, *args) -> None:  # tqdm's title of the bar
            super().on_train_epoch_start(trainer, *args)
            if not _RICH_AVAILABLE and self.train_progress_bar is not None:
                self.train_progress_bar.set_description(f"{stage} · epoch {trainer.current_epoch}")

    return StageProgressBar()


COMPLETE_SUFFIX = ".complete"
"""``<checkpoint>.complete``: written (by rank 0, atomically) after every rank finished saving ``<checkpoint>``,
removed before a new save of it starts. A checkpoint without it is torn or being written."""


def _marker(path: Path | str) -> Path:
    return Path(str(path) + COMPLETE_SUFFIX)


def complete_marked(trainer: L.Trainer) -> None:
    """Make every ``trainer.save_checkpoint`` (ours, ``ModelCheckpoint``'s) leave a completion marker, whatever
    the strategy writes: a file through the checkpoint IO, or a folder of shards that DeepSpeed or FSDP2
    write themselves, which no atomic rename covers."""
    save = trainer.save_checkpoint

    def save_marked(filepath, *args, **kwargs):
        marker = _marker(filepath)
        if trainer.is_global_zero:
            marker.unlink(missing_ok=True)
        trainer.strategy.barrier("checkpoint-unmark")
        save(filepath, *args, **kwargs)
        trainer.strategy.barrier("checkpoint-saved")
        if trainer.is_global_zero:
            atomic_write_json(marker, {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                                       "time": time.time()})

    trainer.save_checkpoint = save_marked


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (``last.ckpt``, or a SLURM preemption's
    ``hpc_ckpt_<n>.ckpt``): the one whose completion marker records the most training steps (then the latest
    time). A checkpoint without a marker (a process killed while saving it) is never resumed from."""
    found = [p for p in [folder / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")] if p.exists()]
    complete = []
    for path in found:
        try:
            record = json.loads(_marker(path).read_text())
        except (OSError, ValueError):
            log.warning("checkpoint %s is incomplete (no %s marker): not resumed from", path, COMPLETE_SUFFIX)
            continue
        complete.append((record.get("global_step", 0), record.get("time", 0.0), path))
    return max(complete)[2] if complete else None


def _hold_master_weights(module: torch.nn.Module) -> dict[torch.nn.Parameter, torch.dtype]:
    """Trainable 16-bit parameters upcast to fp32 in place (mixed precision's master weights); returns
    their dtypes to restore."""
    dtypes = {}
    for param in module.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            dtypes[param] = param.dtype
            param.data = param.data.float()
    return dtypes


def fit(module: L.LightningModule, loader, *, hw: HardwareArgs, logger: Mapping[str, Any], out: Path, stage: str,
        checkpoint_every: int = 0, **settings: Any) -> L.Trainer:
    """Train ``module`` on ``loader`` (from :func:`~alignexp.lightning_modules.datamodule.make_loader`) on all ranks
    under the hardware option's strategy; ``settings`` are Trainer arguments (:func:`schedule`'s, or a
    stage's own). Checkpoints and resume as the module docstring says. Afterwards every model of
    ``module`` is a plain module with its trained weights, on this rank's device. Returns the Trainer."""
    from alignexp.scale.strategies import GatherTrained

    kwargs = trainer_kwargs(hw)
    strategy = kwargs["strategy"]
    gather = GatherTrained(module) if getattr(strategy, "shards_parameters", lambda: False)() else None
    folder = out / "checkpoints" / stage
    preemption = Preemption(folder / "last.ckpt")
    callbacks: list[L.Callback] = [DataPosition(), preemption, *([gather] if gather else []),
                                   *settings.pop("callbacks", [])]
    if settings.get("enable_progress_bar", True):
        callbacks.append(progress_bar(stage))
    if checkpoint_every:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks += [ModelCheckpoint(dirpath=folder, every_n_train_steps=checkpoint_every, save_top_k=0,
                                      save_last=True, save_on_train_epoch_end=False), FinalCheckpoint(folder / "last.ckpt")]
    kwargs["plugins"] = [*kwargs.get("plugins", []), AtomicCheckpointIO()]
    resume = latest_checkpoint(folder)
    accumulate = settings.get("accumulate_grad_batches", 1) or 1
    total = global_batch_size(loader, accumulate)
    if is_main() and total:
        print(f"[alignexp] {stage}: global batch {total} = {loader.batch_sampler.batch_size} per device x "
              f"{world_size()} process(es) x {accumulate} accumulated", flush=True)
    if is_main() and resume:
        print(f"[alignexp] {stage}: resuming from {resume}", flush=True)
    dtypes = _hold_master_weights(module) if master_weights(hw) else {}
    trainer = L.Trainer(**kwargs, logger=make_loggers(logger, out, stage), callbacks=callbacks,
                        enable_checkpointing=bool(checkpoint_every), enable_model_summary=False,
                        default_root_dir=str(folder), num_sanity_val_steps=0, use_distributed_sampler=False,
                        **settings)
    complete_marked(trainer)
    with warnings.catch_warnings():
        # Logged metrics are each rank's own batches (rank 0's reach the loggers): no sync_dist all-reduce per log.
        warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
        if not eval_mode_outside_frozen(module):  # the frozen reference's eval mode is meant; warn of any other
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    if preemption.saved:
        preemption.hand_over()
    if gather is not None:
        if not gather.states:  # a resumed fit that had nothing left to train ends without on_train_end
            gather.on_train_end(trainer, module)
        for name, plain in gather.plain(hw.torch_device).items():
            setattr(module, name, plain)
    for param, dtype in dtypes.items():
        param.data = param.data.to(dtype)
    # Lightning's teardown leaves the module on the CPU: sampling and evaluation run on the device again.
    module.to(hw.torch_device)
    barrier()
    return trainer


def eval_mode_outside_frozen(module: torch.nn.Module) -> list[str]:
    """The submodules in eval mode outside ``module``'s frozen children (a child whose parameters are all
    frozen: the reference model, a judge). Lightning warns of every module in eval mode at the start of a fit,
    so a run with a frozen reference would always warn; only these are worth the warning."""
    frozen = [name for name, child in module.named_children()
              if any(True for _ in child.parameters()) and not any(p.requires_grad for p in child.parameters())]
    return [name for name, sub in module.named_modules()
            if not sub.training and not any(name == f or name.startswith(f + ".") for f in frozen)]


def write_policy(model, tokenizer, folder: Path) -> Path:
    """The policy in Hugging Face format with its tokenizer (LoRA adapters merged into full weights), written
    by this process (a plain model: :func:`fit` leaves one)."""
    from alignexp.models.lora import save_pretrained_merged

    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained_merged(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_policy(model, tokenizer, folder: Path, checkpoints: Path | None = None) -> Path:
    """:func:`write_policy` by rank 0 alone, into a temporary folder renamed to ``folder`` when whole, so that
    ``folder`` is never a partial model; the other ranks wait for it (every rank calls this). A failed write
    (a full disk) leaves nothing at ``folder`` and raises an error that says where the trained weights still
    are (the newest checkpoint of any stage under ``checkpoints``, if any) and how to save them again."""
    from alignexp.distributed import broadcast
    from alignexp.files import atomic_folder

    failure = None
    if is_main():
        try:
            with atomic_folder(folder) as tmp:
                write_policy(model, tokenizer, tmp)
        except OSError as error:
            failure = error.strerror or str(error)
    failure = broadcast(failure if is_main() else None)
    if failure is not None:
        found = [c for stage in sorted(checkpoints.glob("*")) if (c := latest_checkpoint(stage))] if checkpoints else []
        raise PolicyNotSaved(folder, failure, max(found, key=lambda c: c.stat().st_mtime) if found else None)
    return folder


class PolicyNotSaved(AlignexpError):
    """The trained policy could not be written (nothing partial was left); the message says what to do."""

    def __init__(self, folder: Path, reason: str, checkpoint: Path | None):
        run = folder.parent
        if checkpoint is not None:
            where = (f"the trained weights are in the checkpoint {checkpoint}: free some space, then "
                     f"`python -m alignexp.train resume={run}` saves them (the fit has nothing left to train) and "
                     f"evaluates")
        else:
            where = ("no checkpoint holds the trained weights (train.checkpoint_every=0), so they are lost with this "
                     "process: free some space and run again, with train.checkpoint_every=<steps> to keep them")
        super().__init__(f"the trained policy could not be saved to {folder} ({reason}); nothing partial was left "
                         f"there. {where}")
