"""SFTModule: supervised fine-tuning (token-mean NLL of the demonstration), no reference."""

from __future__ import annotations

import torch

from alignexp.lightning_modules.preference import OptimArgs, PreferenceModule


class SFTModule(PreferenceModule):
    """SFT on column 0 of each example: the task's demonstration, or the best response (Preferred-FT)."""

    def __init__(self, policy: torch.nn.Module, optim: OptimArgs | None = None, loss_name: str = "sft"):
        super().__init__(policy, loss_name, {}, optim, reference=None)
        if self.spec.needs_reference:
            raise ValueError(f"SFTModule takes a reference-free loss, not '{loss_name}'")
