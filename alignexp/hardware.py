"""The hardware group builds the Trainer's accelerator, strategy, precision and devices.

Modules never branch on the strategy: everything hardware-specific is decided here, from
``conf/hardware/<name>.yaml``, by one plain function (:func:`build_strategy`) that maps the
config to a Lightning strategy object:

=========================  ===================================================================
``strategy: auto``         one device (``cpu``, ``gpu``)
``strategy: ddp``          :class:`~lightning.pytorch.strategies.DDPStrategy`, one process per device
``strategy: fsdp``         :class:`~lightning.pytorch.strategies.FSDPStrategy`: sharded parameters,
                           gradients and optimizer states (``sharding_strategy``), decoder layers
                           as wrap units, optional activation checkpointing and CPU offload
``strategy: deepspeed``    :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`: ZeRO stage
                           ``zero_stage`` (1, 2, 3) with optional optimizer / parameter offload
=========================  ===================================================================

Multi-GPU and multi-node runs go through Lightning's launchers: ``hardware.devices`` GPUs per
node and ``hardware.num_nodes`` nodes (Lightning starts one process per device, or reads the ranks
from SLURM / torchrun). Mixed precision is ``hardware.precision`` (``bf16-mixed`` on GPU).

This module imports no Hydra, OmegaConf or DeepSpeed at import time (``alignexp.gpu_check`` uses it
on machines without them).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from alignexp.args import HardwareArgs  # noqa: F401  (the settings of the hardware group)

log = logging.getLogger(__name__)

class DecoderLayers:
    """True for a module whose class is one of ``names`` (None: any class name ending in ``DecoderLayer``).

    With ``skip_checkpointed``, layers that the model already checkpoints itself
    (``model.gradient_checkpointing=true`` sets ``layer.gradient_checkpointing``) are left out, so
    FSDP's activation checkpointing never nests inside the model's.
    """

    def __init__(self, names: list[str] | None = None, skip_checkpointed: bool = False):
        self.names = frozenset(names) if names else None
        self.skip_checkpointed = skip_checkpointed

    def __call__(self, module) -> bool:
        name = type(module).__name__
        matches = name in self.names if self.names is not None else name.endswith("DecoderLayer")
        if matches and self.skip_checkpointed and getattr(module, "gradient_checkpointing", False):
            return False
        return matches


def _lambda_policy(matcher: DecoderLayers):
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=matcher)


def build_strategy(hw: HardwareArgs):
    """The Lightning strategy for ``hw``: ``"auto"`` or a fresh strategy object (never shared between Trainers)."""
    if not isinstance(hw.strategy, str) or hw.strategy == "auto":
        return hw.strategy
    if hw.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=hw.process_group_backend,
                           find_unused_parameters=hw.find_unused_parameters)
    if hw.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        checkpointing = _lambda_policy(DecoderLayers(hw.wrap_layers, skip_checkpointed=True)) \
            if hw.activation_checkpointing else None
        # Mixed precision comes from hw.precision (Lightning's FSDPPrecision: bf16 parameters in
        # compute, reduce and buffers for bf16-mixed; the shards keep the model's own dtype).
        return FSDPStrategy(sharding_strategy=hw.sharding_strategy,
                            auto_wrap_policy=_lambda_policy(DecoderLayers(hw.wrap_layers)),
                            activation_checkpointing_policy=checkpointing, cpu_offload=hw.cpu_offload,
                            process_group_backend=hw.process_group_backend, state_dict_type="full",
                            use_orig_params=True, limit_all_gathers=True)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    offload = hw.offload_optimizer or hw.offload_parameters
    if hw.offload_optimizer:  # DeepSpeed's compiled CPU Adam steps the offloaded optimizer (alignexp/offload.py)
        from alignexp.offload import CPUAdamDeepSpeedStrategy as DeepSpeedStrategy
    strategy = DeepSpeedStrategy(stage=hw.zero_stage, offload_optimizer=hw.offload_optimizer,
                                 offload_parameters=hw.offload_parameters, pin_memory=offload,
                                 process_group_backend=hw.process_group_backend, exclude_frozen_parameters=True,
                                 logging_level=logging.WARNING)
    if hw.offload_optimizer:
        # Where the CPU Adam cannot be built, the modules' own optimizer steps on the CPU instead
        # (DeepSpeed would otherwise refuse any optimizer but its DeepSpeedCPUAdam); see docs/scale.md.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


def trainer_kwargs(hw: HardwareArgs) -> dict[str, Any]:
    """Keyword arguments for ``lightning.Trainer`` that this hardware option decides."""
    return {"accelerator": hw.accelerator, "devices": hw.devices, "num_nodes": hw.num_nodes,
            "precision": hw.precision, "strategy": build_strategy(hw)}


class JobStatusCallback:
    """A Hydra callback: one JSON line per finished sweep job in ``<sweep dir>/jobs.jsonl``.

    Hydra runs every job of a multirun even when some fail (an exception in a job is recorded, and
    the sweep reports the first failure once the batch is done; on SLURM each job is its own array
    task). This file lists them all: ``{"num", "overrides", "status", "error", "output_dir"}``, and a
    failed job also prints one line. Enable it in the root config::

        hydra:
          callbacks:
            job_status:
              _target_: alignexp.hardware.JobStatusCallback

    Duck-typed, so this module needs no Hydra import (the GPU check runs without Hydra).
    """

    # Hydra calls every hook of a callback and warns about missing ones: the others do nothing here.
    def on_run_start(self, config, **kwargs) -> None: ...

    def on_run_end(self, config, **kwargs) -> None: ...

    def on_multirun_start(self, config, **kwargs) -> None: ...

    def on_multirun_end(self, config, **kwargs) -> None: ...

    def on_job_start(self, config, **kwargs) -> None: ...

    def on_compose_config(self, config, config_name, overrides) -> None: ...

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN:
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
        if failed:
            print(f"[alignexp] sweep job #{record['num']} ({' '.join(record['overrides'])}) FAILED: "
                  f"{record['error']}; the other jobs go on (status of all: {path})", flush=True)
