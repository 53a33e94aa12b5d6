"""``BF16_PROBE=<folder> python tests/distributed/bf16_probe.py <overrides>``: ``python -m alignexp.train <overrides>`` that
records, on every rank, during the steps of its preference loss, the dtypes of the numbers
that must stay fp32 (DESIGN.md) and of the compute that is meant to be 16-bit, as JSON lines in
``<folder>/rank<r>.jsonl`` (the folder comes through the environment: the launcher starts the other ranks
with this script's own arguments):

* ``ref_logps``, ``rewards``: the batch's precomputed reference log-probs and rewards, as the module receives
  them (after the precision plugin's ``convert_input``);
* ``policy_logps``: the summed log-probs the policy's forward returns (``sequence_logps``);
* ``head_output``: the output head's logits inside that forward (bf16 where the compute is mixed);
* ``master``: every parameter the optimizer steps (for ZeRO-3 its fp32 partitions, which it hands its wrapped
  optimizer one at a time during the step) and ``adam_state`` their moment estimates, after the step; ``module_params``: the trained module's
  parameters as its forward sees them.
"""

import json
import os
from pathlib import Path

import torch

import alignexp.lightning_modules.preference as preference
import alignexp.pipeline.fit as fit

FOLDER = Path(os.environ["BF16_PROBE"])
record_position = fit.DataPosition.on_train_batch_end
original_logps = preference.sequence_logps


def _write(trainer, record: dict) -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    with open(FOLDER / f"rank{trainer.global_rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": trainer.global_step, **record}) + "\n")


def _dtypes(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t is not None})


def _stepped_optimizer(optimizer):
    """The torch optimizer that holds the weights it steps (DeepSpeed wraps one in its ZeRO optimizer)."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__module__.startswith("deepspeed"):
        optimizer = optimizer.optimizer
    return optimizer


def sequence_logps(model, batch):
    seen = {}

    def note(module, args, output) -> None:
        seen.setdefault("head_output", _dtypes([output]))

    hook = model.get_output_embeddings().register_forward_hook(note)
    try:
        out = original_logps(model, batch)
    finally:
        hook.remove()
    trainer = getattr(sequence_logps, "trainer", None)
    if trainer is not None and model.training:
        _write(trainer, {"policy_logps": _dtypes([out[0]]), "ref_logps": _dtypes([batch.ref_logps]),
                         "rewards": _dtypes([batch.rewards]),
                         "autocast": torch.is_autocast_enabled("cpu"), **seen})
    return out


def _probed(pl_module) -> bool:
    """The preference loss's steps (the SFT policy's, which has no reference, are not probed)."""
    return getattr(getattr(pl_module, "spec", None), "needs_reference", False)


def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
    sequence_logps.trainer = trainer if _probed(pl_module) else None


def on_train_batch_end(self, trainer, pl_module, *args) -> None:
    record_position(self, trainer, pl_module, *args)
    if not _probed(pl_module):
        return
    flats = getattr(trainer.optimizers[0], "fp32_partitioned_groups_flat", None)  # ZeRO-3's master partitions
    optimizer = _stepped_optimizer(trainer.optimizers[0])
    params = list(flats) if flats is not None else [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for p in params for v in optimizer.state.get(p, {}).values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    _write(trainer, {"master": _dtypes(params), "adam_state": _dtypes(state),
                     "module_params": _dtypes(p for p in pl_module.policy.parameters() if p.requires_grad),
                     "optimizer": type(optimizer).__name__})


preference.sequence_logps = sequence_logps
fit.DataPosition.on_train_batch_start = on_train_batch_start
fit.DataPosition.on_train_batch_end = on_train_batch_end

if __name__ == "__main__":
    from alignexp.train import main

    main()
