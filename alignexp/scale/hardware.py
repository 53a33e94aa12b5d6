"""The hardware group builds the Trainer's accelerator, strategy, precision and devices.

Modules never branch on the strategy: everything hardware-specific is decided here, from
``conf/hardware/<name>.yaml``, by one plain function (:func:`build_strategy`) that maps the
config to a Lightning strategy object (:mod:`alignexp.scale.strategies`):

=========================  ===================================================================
``strategy: auto``         one device (``cpu``, ``gpu``)
``strategy: ddp``          :class:`~lightning.pytorch.strategies.DDPStrategy`, one process per device
``strategy: fsdp``         FSDP2 (``fully_shard``, :class:`alignexp.scale.strategies.FSDP2`): parameters,
                           gradients and optimizer states sharded per parameter over all ranks, each
                           decoder layer a unit, fp32 master weights with bf16 compute
``strategy: deepspeed``    DeepSpeed ZeRO stage ``zero_stage`` (1, 2, 3) with optional optimizer /
                           parameter offload (:class:`alignexp.scale.strategies.DeepSpeedAnyDevice`; on
                           GPUs, or on CPU ranks with gloo)
=========================  ===================================================================

The processes are started once, before the first stage (:mod:`alignexp.scale.launch`):
``hardware.devices`` per node and ``hardware.num_nodes`` nodes. Precision is ``hardware.precision``:
``bf16-mixed`` keeps fp32 master weights under every strategy (the trainable parameters are held in
fp32 while they train, :func:`master_weights`); ``bf16-true`` trains pure bf16, only when asked for.
``hardware=auto`` (the default) picks one of the options for the machine (:func:`resolve_auto`).

This module imports no Hydra, OmegaConf or DeepSpeed at import time (``alignexp.gpu_check`` uses it
on machines without them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from alignexp.args import HardwareArgs  # noqa: F401  (the settings of the hardware group)
from alignexp.scale.launch import devices_per_node, slurm_tasks

log = logging.getLogger(__name__)


def build_strategy(hw: HardwareArgs):
    """The Lightning strategy for ``hw``: ``"auto"`` or a fresh strategy object (never shared between Trainers)."""
    if not isinstance(hw.strategy, str) or hw.strategy == "auto":
        return hw.strategy
    if hw.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=hw.process_group_backend,
                           find_unused_parameters=hw.find_unused_parameters)
    if hw.strategy == "fsdp":
        from alignexp.scale.strategies import FSDP2

        return FSDP2(devices_per_node(hw) * hw.num_nodes, mixed_precision=hw.precision.endswith("-mixed"),
                     reshard_after_forward=hw.sharding_strategy == "FULL_SHARD", cpu_offload=hw.cpu_offload,
                     activation_checkpointing=hw.activation_checkpointing, wrap_layers=hw.wrap_layers,
                     process_group_backend=hw.process_group_backend)
    if hw.device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    from alignexp.scale.strategies import DeepSpeedAnyDevice

    offload = hw.offload_optimizer or hw.offload_parameters
    strategy_class = DeepSpeedAnyDevice
    if hw.offload_optimizer:  # DeepSpeed's compiled CPU Adam steps the offloaded optimizer (alignexp/scale/offload.py)
        from alignexp.scale.strategies import OffloadedDeepSpeed as strategy_class
    strategy = strategy_class(stage=hw.zero_stage, offload_optimizer=hw.offload_optimizer,
                              offload_parameters=hw.offload_parameters, pin_memory=offload,
                              process_group_backend=hw.process_group_backend, exclude_frozen_parameters=True,
                              logging_level=logging.WARNING)
    # Gradients accumulated over micro-batches and reduced over ranks in fp32, as under DDP and FSDP2 (DeepSpeed's
    # defaults are the model's dtype for both, bf16 under bf16-mixed): the fp32 master weights are updated with
    # fp32 gradients.
    strategy.config.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    strategy.config["communication_data_type"] = "fp32"
    if hw.zero_persistence_threshold is not None:
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = hw.zero_persistence_threshold
    if hw.offload_optimizer:
        # Where the CPU Adam cannot be built, the modules' own optimizer steps on the CPU instead
        # (DeepSpeed would otherwise refuse any optimizer but its DeepSpeedCPUAdam); see docs/scale.md.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


def precision_settings(hw: HardwareArgs) -> dict[str, Any]:
    """The Trainer's ``precision`` or ``plugins`` for ``hw``. Where Lightning would convert a whole batch
    to 16 bits (DeepSpeed, ``*-true`` half precision), a plugin that keeps the reference log-probs and
    rewards fp32; under FSDP2 the mixed precision is its ``MixedPrecisionPolicy`` (the Trainer's is 32-bit)."""
    from alignexp.scale.strategies import DeepSpeedBatchPrecision, HalfBatchPrecision

    if hw.strategy == "deepspeed":
        return {"plugins": [DeepSpeedBatchPrecision(hw.precision)]}
    if hw.precision in ("bf16-true", "16-true"):
        return {"plugins": [HalfBatchPrecision(hw.precision)]}
    if hw.strategy == "fsdp" and hw.precision.endswith("-mixed"):
        return {"precision": "32-true"}
    return {"precision": hw.precision}


def trainer_kwargs(hw: HardwareArgs) -> dict[str, Any]:
    """Keyword arguments for ``lightning.Trainer`` that this hardware option decides. Under SLURM tasks (one per
    process), Lightning's SLURM environment without its own requeue on USR1: the preemption handler of
    :mod:`alignexp.pipeline.fit` is the one that saves and requeues (two would save twice and requeue twice
    inside the warning time)."""
    devices = devices_per_node(hw) if hw.devices in ("auto", -1) and slurm_tasks() > 1 else hw.devices
    kwargs = {"accelerator": hw.accelerator, "devices": devices, "num_nodes": hw.num_nodes,
              "strategy": build_strategy(hw), **precision_settings(hw)}
    if slurm_tasks() and slurm_tasks() == devices_per_node(hw) * hw.num_nodes:
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        kwargs["plugins"] = [*kwargs.get("plugins", []), SLURMEnvironment(auto_requeue=False)]
    return kwargs


def master_weights(hw: HardwareArgs) -> bool:
    """Whether the trainable parameters are held in fp32 while they train: mixed precision outside DeepSpeed
    (whose optimizer keeps its own fp32 master copy of its 16-bit parameters)."""
    return hw.precision.endswith("-mixed") and hw.strategy != "deepspeed"


def choose_auto(hw: HardwareArgs, run=None, single_process: bool = False) -> tuple[HardwareArgs, str]:
    """The option ``hardware=auto`` stands for on this machine, and why: the CPU without CUDA; one GPU; all
    GPUs of the node with DDP, or DeepSpeed ZeRO-3 where ``python -m alignexp.plan`` says the run (``run``,
    its :class:`~alignexp.args.RunArgs`) does not fit under DDP. ``single_process``: at most one GPU (a
    command that runs one process, e.g. ``alignexp.sample``)."""
    import torch

    common = {"threads": hw.threads, "num_nodes": hw.num_nodes}
    if not torch.cuda.is_available():
        return HardwareArgs(name="cpu", **common), "no CUDA device"
    from alignexp.scale.plan import choose_multi_gpu, one_gpu, plan_for_run

    gpus = torch.cuda.device_count() if hw.devices in ("auto", -1) else devices_per_node(hw)
    gpu = one_gpu(hw)
    if gpus == 1 or single_process:
        return gpu, f"{torch.cuda.device_count()} CUDA device(s), one process"
    memory = hw.gpu_memory_gib or torch.cuda.get_device_properties(0).total_memory / 2**30
    peak_gib = None if run is None else (lambda option: plan_for_run(run, option).peak_gib)
    return choose_multi_gpu(gpu, gpus, memory, peak_gib)


def resolve_auto(run, single_process: bool = False):
    """``run`` (:class:`~alignexp.args.RunArgs`) with ``hardware=auto`` replaced by :func:`choose_auto`'s option,
    which is printed with its reason; other options unchanged."""
    import dataclasses

    if run.hardware.name != "auto":
        return run
    hw, why = choose_auto(run.hardware, run, single_process)
    from alignexp.distributed import env_rank

    if env_rank() == 0:
        print(f"[alignexp] hardware=auto: {hw.name} ({why}); {hw.accelerator}, devices={hw.devices}, "
              f"precision {hw.precision}. Choose with hardware=cpu|gpu|ddp|deepspeed_zero3|fsdp", flush=True)
    return dataclasses.replace(run, hardware=hw)


class JobStatusCallback:
    """A Hydra callback: one JSON line per finished sweep job in ``<sweep dir>/jobs.jsonl``.

    Hydra runs every job of a multirun even when some fail (an exception in a job is recorded, and
    the sweep reports the first failure once the batch is done; on SLURM each job is its own array
    task). This file lists them all: ``{"num", "overrides", "status", "error", "output_dir"}``, and a
    failed job also prints one line. Enable it in the root config::

        hydra:
          callbacks:
            job_status:
              _target_: alignexp.scale.hardware.JobStatusCallback

    Duck-typed, so this module needs no Hydra import (the GPU check runs without Hydra).
    """

    # Hydra calls every hook of a callback and warns about missing ones: the others do nothing here.
    def on_run_start(self, config, **kwargs) -> None: ...

    def on_run_end(self, config, **kwargs) -> None: ...

    def on_multirun_start(self, config, **kwargs) -> None:
        """Writes the sweep's size to ``<sweep dir>/jobs_total`` (:mod:`alignexp.sweeps`: progress)."""
        from alignexp.sweeps import TOTAL_FILE, sweep_size

        total = sweep_size(config)
        if total is not None:
            folder = Path(str(config.hydra.sweep.dir))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TOTAL_FILE).write_text(f"{total}\n")

    def on_multirun_end(self, config, **kwargs) -> None: ...

    def on_job_start(self, config, **kwargs) -> None: ...

    def on_compose_config(self, config, config_name, overrides) -> None: ...

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from alignexp.distributed import env_rank

        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN or env_rank() != 0:  # one line per job, from its rank 0
            return
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None
        record = {"num": hydra_cfg.job.num, "overrides": list(job_return.overrides or []),
                  "status": job_return.status.name, "error": f"{type(error).__name__}: {error}" if failed else None,
                  "output_dir": hydra_cfg.runtime.output_dir}
        path = Path(str(hydra_cfg.sweep.dir)) / "jobs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:  # one short append per job: safe across SLURM tasks on a shared FS
            handle.write(json.dumps(record) + "\n")
        from alignexp.sweeps import sweep_progress

        done, total = sweep_progress(path.parent)
        progress = f"{done} of {total if total is not None else '?'} jobs finished"
        if failed:
            print(f"[alignexp] sweep job #{record['num']} ({' '.join(record['overrides'])}) FAILED: "
                  f"{record['error']}; the other jobs go on ({progress}; status of all: {path})", flush=True)
        else:
            print(f"[alignexp] sweep job #{record['num']} ({' '.join(record['overrides'])}) {record['status']}: "
                  f"{progress}", flush=True)
