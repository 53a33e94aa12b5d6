"""The one optimiser set-up every training stage uses: AdamW with a linear learning-rate warmup."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from alignexp.args import OptimArgs


def adamw_with_warmup(params: Iterable[torch.nn.Parameter], optim: OptimArgs):
    """AdamW on ``params`` and a per-step scheduler whose factor rises linearly to 1 over ``warmup_steps``
    (step s uses min(1, (s + 1) / warmup_steps) of ``lr``)."""
    optimizer = torch.optim.AdamW(list(params), lr=optim.lr, weight_decay=optim.weight_decay,
                                  betas=tuple(optim.betas))
    warmup = max(1, optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler
