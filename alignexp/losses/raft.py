"""RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment"):
fine-tuning on the reward-ranked best samples is SFT on them, so ``raft`` is the ``sft`` loss
registered under RAFT's name. The ranking and filtering happen in the ``raft`` sampler
(:class:`alignexp.sampling.samplers.RaftSampler`), which gives one kept sample per example (column 0).
"""

from __future__ import annotations

from alignexp.losses.registry import register_loss
from alignexp.losses.sft import sft_loss

register_loss("raft", needs_reference=False, min_responses=1)(sft_loss)
