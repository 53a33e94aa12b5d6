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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


@dataclass
class HardwareArgs:
    """What ``conf/hardware/*.yaml`` gives (every field has a default, so old YAMLs keep working).

    ``devices``: devices per node (an int, ``auto``, or a list of device indices); ``num_nodes``:
    nodes. ``strategy``: one of :data:`STRATEGIES`. DeepSpeed: ``zero_stage``, ``offload_optimizer``,
    ``offload_parameters`` (stage 3 only). FSDP: ``sharding_strategy``, ``activation_checkpointing``,
    ``cpu_offload``; ``wrap_layers`` names the decoder-layer classes that become FSDP units and
    checkpointed blocks (None: every class whose name ends in ``DecoderLayer``). DDP/FSDP/DeepSpeed:
    ``process_group_backend`` (None: NCCL on GPU, Gloo on CPU), ``find_unused_parameters`` (DDP).
    ``gpu_memory_gib``: memory of one device, read by ``python -m alignexp.plan``.
    """

    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    strategy: Any = "auto"
    threads: int | None = None
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_parameters: bool = False
    sharding_strategy: str = "FULL_SHARD"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    wrap_layers: list[str] | None = None
    process_group_backend: str | None = None
    find_unused_parameters: bool = False
    gpu_memory_gib: float | None = None

    def __post_init__(self) -> None:
        if self.wrap_layers is not None:
            self.wrap_layers = [str(name) for name in self.wrap_layers]
        if not isinstance(self.devices, (int, str)):  # a ListConfig or tuple of device indices
            self.devices = [int(d) for d in self.devices]
        if isinstance(self.strategy, str) and self.strategy not in STRATEGIES:
            raise ValueError(f"hardware.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"hardware.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.precision = str(self.precision)
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ValueError(f"hardware.devices must be a number, 'auto' or a list of indices, got {self.devices!r}")
        if isinstance(self.devices, int) and (self.devices == 0 or self.devices < -1):
            raise ValueError(f"hardware.devices must be >= 1 (or -1 / 'auto' for all), got {self.devices}")
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ValueError(f"hardware.num_nodes must be an integer >= 1, got {self.num_nodes!r}")
        if self.strategy == "deepspeed":
            if self.zero_stage not in (1, 2, 3):
                raise ValueError(f"hardware.zero_stage must be 1, 2 or 3 with strategy=deepspeed, got {self.zero_stage!r}")
            if self.offload_parameters and self.zero_stage != 3:
                raise ValueError("hardware.offload_parameters needs hardware.zero_stage=3 (ZeRO-Infinity offloads "
                                 f"parameters only in stage 3), got zero_stage={self.zero_stage}")
        elif self.zero_stage is not None or self.offload_optimizer or self.offload_parameters:
            raise ValueError(f"hardware.zero_stage / offload_optimizer / offload_parameters are DeepSpeed settings; "
                             f"hardware.strategy is {self.strategy!r} (use hardware=deepspeed_zero2|deepspeed_zero3|...)")
        if self.sharding_strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"hardware.sharding_strategy must be one of {', '.join(SHARDING_STRATEGIES)}, "
                             f"got {self.sharding_strategy!r}")
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            raise ValueError(f"hardware.gpu_memory_gib must be > 0, got {self.gpu_memory_gib!r}")

    @property
    def torch_device(self) -> str:
        """Where models live outside Lightning's fit (sampling, reference log-probs, evaluation)."""
        import torch

        return "cuda" if self.device_type == "cuda" and torch.cuda.is_available() else "cpu"

    @property
    def device_type(self) -> str:
        return "cuda" if self.accelerator in ("gpu", "cuda") else self.accelerator

    @property
    def world_size(self) -> int:
        """Processes in the run: devices per node times nodes. Needs a definite ``devices``."""
        if isinstance(self.devices, list):
            return len(self.devices) * self.num_nodes
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"hardware.devices={self.devices!r}: give the number of devices per node "
                             f"(e.g. hardware.devices=8)")
        return self.devices * self.num_nodes


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
