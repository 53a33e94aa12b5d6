"""The Lightning strategies and precision plugins the hardware group builds, and the trained model taken
back out of a sharded strategy as a plain one.

* :class:`DeepSpeedAnyDevice`: Lightning's DeepSpeed strategy, which also runs on the CPU (DeepSpeed's
  CPU accelerator and gloo), so ZeRO-3's partitioned save, gather and generation run in the tests.
* :class:`FSDP2`: Lightning's ``ModelParallelStrategy`` with every decoder layer and each model of the
  LightningModule sharded by ``torch.distributed.fsdp.fully_shard`` (per-parameter sharding; fp32
  master weights with bf16 compute through ``MixedPrecisionPolicy``; on the CPU with gloo too).
* precision plugins that convert a batch to 16 bits except the numbers that must stay fp32: the
  precomputed reference log-probs and rewards (:data:`FULL_PRECISION_FIELDS`).
* :class:`GatherTrained`: after a fit under ZeRO-3 or FSDP2, every rank gets each model back whole, as
  a plain module (its parameters gathered into a copy of the module's structure made before the fit),
  so saving, sampling and evaluation run on each rank without collectives (no deadlock in a decode
  loop whose length depends on the data).
"""

from __future__ import annotations

import argparse
import copy
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, HalfPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from alignexp.scale.offload import CPUAdamDeepSpeedStrategy

log = logging.getLogger(__name__)

FULL_PRECISION_FIELDS = ("ref_logps", "rewards")
"""Batch attributes a precision plugin leaves in fp32 (bf16 has a step of 2 nats at -300)."""


def _keep_full_precision(data: Any, converted: Any) -> Any:
    for name in FULL_PRECISION_FIELDS:
        value = getattr(data, name, None)
        if isinstance(value, torch.Tensor):
            setattr(converted, name, value)
    return converted


class DeepSpeedBatchPrecision(DeepSpeedPrecision):
    """DeepSpeed's precision plugin; the reference log-probs and rewards of a batch stay fp32."""

    def convert_input(self, data: Any) -> Any:
        return _keep_full_precision(data, super().convert_input(data))


class HalfBatchPrecision(HalfPrecision):
    """Pure 16-bit training (``bf16-true``); the reference log-probs and rewards of a batch stay fp32."""

    def convert_input(self, data: Any) -> Any:
        return _keep_full_precision(data, super().convert_input(data))


class DeepSpeedAnyDevice(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy without its refusal of the CPU: on CPU ranks DeepSpeed runs on its CPU
    accelerator (``DS_ACCELERATOR=cpu``) over gloo. On GPUs it is Lightning's strategy unchanged."""

    def _on_cpu(self) -> bool:
        return self.parallel_devices is not None and self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        return super(DeepSpeedStrategy, self).setup_environment()  # DDP's: accelerator, then setup_distributed

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # as Lightning does, without its check of GPU indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, optimizer

    def shards_parameters(self) -> bool:
        return self.zero_stage_3

    def full_state(self, module: nn.Module, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """Every parameter of ``module`` whole, in ``dtypes[name]``, on every rank (ZeRO-3 gathers one
        parameter at a time from its partitions)."""
        import deepspeed

        state = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.data.detach().to(dtypes[name], copy=True)
        return state


class OffloadedDeepSpeed(CPUAdamDeepSpeedStrategy, DeepSpeedAnyDevice):
    """ZeRO with the optimizer offloaded: DeepSpeed's CPU Adam (:mod:`alignexp.scale.offload`), on any device."""


def layer_class_names(model: nn.Module) -> frozenset[str]:
    """The classes of ``model``'s repeated blocks, as the model itself declares them: Hugging Face's
    ``_no_split_modules`` of every pretrained model inside it (a PEFT wrapper holds one), e.g.
    ``LlamaDecoderLayer``, ``GPT2Block``, ``GPTJBlock``, ``GPTNeoXLayer``. A model that declares none:
    every class whose name ends in ``DecoderLayer``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return frozenset(names)


class DecoderLayers:
    """True for a module whose class is one of ``names``; None: one of the model's own block classes
    (:func:`layer_class_names`, given with :meth:`of`), or, for a model that declares none, any class name
    ending in ``DecoderLayer``."""

    def __init__(self, names: list[str] | None = None, declared: frozenset[str] | None = None):
        self.names = frozenset(names) if names else None
        self.declared = declared or None

    def of(self, model: nn.Module) -> DecoderLayers:
        """These settings for ``model``: its declared block classes where no names were given."""
        return self if self.names is not None else DecoderLayers(None, layer_class_names(model))

    def __call__(self, module: nn.Module) -> bool:
        name = type(module).__name__
        if self.names is not None:
            return name in self.names
        return name in self.declared if self.declared else name.endswith("DecoderLayer")


def called_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 roots of ``model``: the modules the log-prob and reward code call directly instead of
    ``model.forward``, i.e. the decoder (``get_decoder()``, or a classifier's ``base_model``) and each head
    beside it (the output embeddings, a score head); ``model`` itself where it has no separate decoder.
    Each is its own root, so calling it gathers its parameters (a root wrapping the whole model would
    gather nothing when only its decoder is called)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        return [model]
    parent = next((m for m in model.modules() if any(child is decoder for child in m.children())), None)
    heads = [c for c in parent.children() if c is not decoder and next(c.parameters(), None) is not None] \
        if parent is not None else []
    shared = {id(p) for p in decoder.parameters()} & {id(p) for head in heads for p in head.parameters()}
    if shared:
        from alignexp.errors import ConfigError

        raise ConfigError("hardware=fsdp: the model ties its output head to its input embeddings, which FSDP2 "
                          "cannot shard as separate roots; use hardware=deepspeed_zero3")
    return [decoder, *heads]


class FSDP2(ModelParallelStrategy):
    """FSDP2 on every rank (a 1-D mesh of ``world_size``): in each model of the LightningModule (the policy, a
    frozen reference) each decoder layer (``wrap_layers``; None: the model's own ``_no_split_modules``), then the decoder and its heads
    (:func:`called_units`) are ``fully_shard``-ed when the fit starts.

    ``mixed_precision``: fp32 parameters (the master weights) sharded, bf16 in forward and backward,
    gradients reduced in fp32 (``MixedPrecisionPolicy``). ``reshard_after_forward``: FULL_SHARD
    (True) or SHARD_GRAD_OP. ``activation_checkpointing``: the model's own non-reentrant checkpointing
    of its decoder layers (``gradient_checkpointing_enable``), which the log-prob code sees.
    """

    def __init__(self, world_size: int, *, mixed_precision: bool, reshard_after_forward: bool = True,
                 cpu_offload: bool = False, activation_checkpointing: bool = False,
                 wrap_layers: list[str] | None = None, process_group_backend: str | None = None):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         process_group_backend=process_group_backend)
        self.mixed_precision, self.reshard_after_forward = mixed_precision, reshard_after_forward
        self.cpu_offload, self.activation_checkpointing = cpu_offload, activation_checkpointing
        self.layers = DecoderLayers(wrap_layers)

    def shard(self, module: L.LightningModule) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        settings = {"mesh": self.device_mesh["data_parallel"], "reshard_after_forward": self.reshard_after_forward,
                    "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()}
        if self.mixed_precision:
            settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for model in module.children():
            if next(model.parameters(), None) is None:
                continue
            trains = any(p.requires_grad for p in model.parameters())
            if self.activation_checkpointing and trains and hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            is_layer = self.layers.of(model)
            # innermost first (a declared class may sit inside another): FSDP2 shards children before parents
            for layer in reversed([m for m in model.modules() if is_layer(m)]):
                fully_shard(layer, **settings)
            for unit in called_units(model):
                fully_shard(unit, **settings)

    def setup(self, trainer: L.Trainer) -> None:
        """Lightning's setup, with the sharding applied here instead of in a ``configure_model`` hook."""
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        self.accelerator.setup(trainer)
        self.shard(self.lightning_module)
        self.model = self.precision_plugin.convert_module(self.model)
        self.place_model()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def place_model(self) -> None:
        """The sharded model onto this rank's device; with ``cpu_offload`` only its buffers: the offloaded
        parameter shards stay in host memory, where FSDP2's lazy init requires them (it refuses a
        ``CPUOffloadPolicy`` parameter on the GPU) and copies each to the GPU for its forward and backward."""
        if not self.cpu_offload:
            self.model_to_device()
            return
        device = self.root_device
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)

    def shards_parameters(self) -> bool:
        return True

    def full_state(self, module: nn.Module, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """Every parameter of ``module`` whole, in ``dtypes[name]``, on every rank (each DTensor's
        ``full_tensor``, one parameter at a time: the fp32 master shards become the model's dtype)."""
        from torch.distributed.tensor import DTensor

        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to(dtypes[name], copy=True)
                for name, p in module.named_parameters()}


def meta_copy(module: nn.Module) -> nn.Module:
    """``module``'s structure and settings (dropout, checkpointing flags, adapters, buffers) with every
    parameter replaced by a meta tensor of its shape and dtype: what :func:`restore` fills."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def restore(skeleton: nn.Module, state: dict[str, torch.Tensor], device: torch.device | str) -> nn.Module:
    """Fill ``skeleton`` (a :func:`meta_copy`) with the tensors of ``state`` (named as its parameters), each
    in the skeleton's dtype, on ``device``; tied parameters stay tied. Returns the plain module."""
    new: dict[int, nn.Parameter] = {}
    for name, param in skeleton.named_parameters():
        if name not in state:
            raise KeyError(f"the gathered weights have no parameter {name!r}")
        new[id(param)] = nn.Parameter(state[name].to(device=device, dtype=param.dtype),
                                      requires_grad=param.requires_grad)
    for submodule in skeleton.modules():
        for key, param in list(submodule._parameters.items()):
            if param is not None:
                submodule._parameters[key] = new[id(param)]
    return skeleton.to(device)


class GatherTrained(L.Callback):
    """Under a strategy that shards parameters: a :func:`meta_copy` of each model of the LightningModule when
    the fit starts, its parameters gathered when training ends (all ranks, before Lightning's teardown),
    and :meth:`plain` models afterwards, which :func:`alignexp.pipeline.fit.fit` puts back in the module."""

    def __init__(self, module: L.LightningModule):
        self.skeletons = {name: meta_copy(child) for name, child in module.named_children()
                          if next(child.parameters(), None) is not None}
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        children = dict(pl_module.named_children())
        self.states = {name: trainer.strategy.full_state(children[name], {n: p.dtype for n, p in
                                                                          skeleton.named_parameters()})
                       for name, skeleton in self.skeletons.items()}

    def plain(self, device: torch.device | str) -> dict[str, nn.Module]:
        if set(self.states) != set(self.skeletons):
            raise RuntimeError("the fit ended before its trained weights were gathered")
        return {name: restore(self.skeletons[name], self.states.pop(name), device) for name in self.skeletons}
