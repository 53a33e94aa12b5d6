"""DeepSpeed's CPU Adam for ZeRO with the optimizer offloaded to CPU memory.

There the fp32 master weights and Adam's moments live in CPU memory and are stepped by the CPU.
:class:`CPUAdamDeepSpeedStrategy` gives DeepSpeed its compiled, vectorised ``DeepSpeedCPUAdam`` in
place of the modules' ``torch.optim.AdamW`` (or ``Adam``), with the same parameter groups and
hyper-parameters, so the modules stay unaware of the strategy. DeepSpeed compiles the op at its first
use (a C++ compiler is needed; about 1.5 minutes on 2 cores, cached afterwards). Where it cannot be
built, or the optimizer is not Adam, the modules' optimizer steps on the CPU as it is (the strategy sets
``zero_force_ds_cpu_optimizer: false``), and a warning says why.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

log = logging.getLogger(__name__)


def cpu_adam_like(optimizer: torch.optim.Optimizer):
    """A ``DeepSpeedCPUAdam`` over ``optimizer``'s parameter groups, with its learning rates, betas, eps and
    weight decay (decoupled for AdamW, L2 for Adam); ``optimizer`` must not have stepped yet."""
    if not isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        raise TypeError(f"DeepSpeed's CPU Adam replaces torch's Adam or AdamW, not {type(optimizer).__name__}")
    groups = [dict(group) for group in optimizer.param_groups]
    if optimizer.state:
        raise ValueError("the optimizer has stepped already: its state would be lost")
    if any(g.get("amsgrad") or g.get("maximize") for g in groups):
        raise ValueError("DeepSpeed's CPU Adam has no amsgrad or maximize")
    decoupled = {bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))) for g in groups}
    if len(decoupled) > 1:
        raise ValueError("parameter groups mix decoupled and L2 weight decay")
    for g in groups:
        g["lr"] = float(g["lr"])
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    first = groups[0]
    return DeepSpeedCPUAdam(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"],
                            weight_decay=first["weight_decay"], adamw_mode=decoupled.pop())


class CPUAdamDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, handing DeepSpeed :func:`cpu_adam_like` of the module's optimizer
    (its learning-rate scheduler, if any, is moved over to it)."""

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if optimizer is not None:
            try:
                adam = cpu_adam_like(optimizer)
            except Exception as error:  # an optimizer it cannot replace, or an op that cannot be built
                log.warning("ZeRO offload: the optimizer steps with %s on the CPU, not DeepSpeed's CPU Adam (%s)",
                            type(optimizer).__name__, error)
            else:
                log.info("ZeRO offload: DeepSpeed's CPU Adam steps the offloaded optimizer")
                if lr_scheduler is not None:
                    lr_scheduler.optimizer = adam
                optimizer = adam
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
