"""One batched forward over encoded examples: pack, run, keep each example's real response slots.

Reference log-probs, a policy's log-probs in evaluation and a reward model's scores are the same loop
with a different forward (:func:`alignexp.models.logprobs.sequence_logps`,
:func:`alignexp.judges.reward_model.sequence_scores`), so it is written once here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from alignexp.models.logprobs import EncodedExample, PackedBatch, pack

Forward = Callable[[torch.nn.Module, PackedBatch], Tensor]
"""``forward(model, batch) -> (B, n)``: one value per response slot; ``batch.mask`` selects the real ones."""


@torch.no_grad()
def map_batches(model: torch.nn.Module, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int,
                forward: Forward, desc: str | None = None) -> list[Tensor]:
    """``forward`` over ``encoded`` in batches of ``batch_size`` examples, in eval mode without gradients
    (the model's mode is restored). Returns each example's values of its n responses, (n,) float32 on
    the CPU, in order. ``desc``: a tqdm bar with that title (None: no bar)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, len(encoded), batch_size)
    if desc is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)
    rows: list[Tensor] = []
    try:
        for start in starts:
            chunk = encoded[start:start + batch_size]
            batch = pack(chunk, pad_id=pad_id).to(device)
            values = forward(model, batch)
            rows.extend(values[i][batch.mask[i]].float().cpu() for i in range(len(chunk)))
    finally:
        model.train(was_training)
    return rows
