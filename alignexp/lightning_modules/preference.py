"""PreferenceModule: a policy, a registered loss, and (optionally) a frozen reference. Nothing else.

The log-probs come from :func:`alignexp.models.logprobs.sequence_logps`, the maths from
:func:`alignexp.losses.get_loss`; this module only wires them into Lightning.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from alignexp.args import OptimArgs
from alignexp.lightning_modules.optim import adamw_with_warmup
from alignexp.losses import LossOutput, get_loss
from alignexp.models.logprobs import PackedBatch, sequence_logps
from alignexp.models.reference import reference_logps


class PreferenceModule(L.LightningModule):
    """Trains ``policy`` with the loss ``loss_name``; the reference comes precomputed in each batch
    (``batch.ref_logps``) or from ``reference``, a frozen model."""

    def __init__(self, policy: torch.nn.Module, loss_name: str, loss_hparams: dict | None = None,
                 optim: OptimArgs | None = None, reference: torch.nn.Module | None = None):
        super().__init__()
        self.policy, self.reference = policy, reference
        policy.train()  # from_pretrained returns models in eval mode
        self.spec = get_loss(loss_name)
        self.loss_hparams = dict(loss_hparams or {})
        self.optim = optim or OptimArgs()
        self.with_target = self.spec.uses_target
        if reference is not None:
            reference.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def compute_loss(self, batch: PackedBatch) -> LossOutput:
        logps, lengths, mask = sequence_logps(self.policy, batch)
        extra: dict[str, Tensor] = {}
        if self.with_target:  # the collator packed the target response as the last column
            extra["target_logps"] = logps[:, -1]
            logps, lengths, mask = logps[:, :-1], lengths[:, :-1], mask[:, :-1]
        ref_logps = None
        if self.spec.needs_reference:
            ref_logps = batch.ref_logps
            if ref_logps is None:
                if self.reference is None:
                    raise RuntimeError(f"loss '{self.spec.name}' needs a reference: precomputed log-probs or a model")
                ref_logps = reference_logps(self.reference, batch)
            # fp32 at least (bf16 policy log-probs included): a DPO margin is a difference of two sums of
            # hundreds of log-probs, whose bf16 step is 2 nats at -300
            dtype = torch.promote_types(logps.dtype, torch.float32)
            logps, ref_logps = logps.to(dtype), ref_logps[:, :logps.shape[1]].to(dtype)
        rewards = batch.rewards[:, :logps.shape[1]] if batch.rewards is not None else None
        return self.spec(logps, ref_logps=ref_logps, lengths=lengths, rewards=rewards, mask=mask,
                         **extra, **self.loss_hparams)

    def _step(self, batch: PackedBatch, stage: str) -> Tensor:
        out = self.compute_loss(batch)
        size = batch.lengths.shape[0]
        self.log(f"{stage}/loss", out.loss.detach(), batch_size=size, prog_bar=True,
                 on_step=stage == "train", on_epoch=True)
        for name, value in out.metrics.items():
            self.log(f"{stage}/{name}", value.detach().float(), batch_size=size,
                     on_step=stage == "train", on_epoch=True)
        return out.loss

    def training_step(self, batch: PackedBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self):
        optimizer, scheduler = adamw_with_warmup((p for p in self.policy.parameters() if p.requires_grad),
                                                 self.optim)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
