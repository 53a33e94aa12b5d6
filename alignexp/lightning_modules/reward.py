"""RewardModule: a reward model trained on rankings with the ``reward`` loss. Nothing else.

The scores come from :func:`alignexp.judges.reward_model.sequence_scores` (the packed batches of
:mod:`alignexp.models.logprobs`), the maths from the registered ``reward`` loss (Bradley-Terry on
pairs, Plackett-Luce on rankings); the helpers below split held-out rankings off, measure ranking
accuracy and normalise the rewards after training.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from alignexp.judges.reward_model import OFFSET_KEY, score_encoded, sequence_scores
from alignexp.lightning_modules.preference import OptimArgs, PreferenceModule
from alignexp.losses import LossOutput
from alignexp.models.logprobs import EncodedExample, PackedBatch
from alignexp.tasks.base import RankedExample


class RewardModule(PreferenceModule):
    """Trains ``model`` (a sequence-classification model, one output) with the ``reward`` loss; the
    loss gets the rewards (B, n) in its ``policy_logps`` slot. No reference."""

    def __init__(self, model: torch.nn.Module, loss_hparams: dict | None = None, optim: OptimArgs | None = None):
        super().__init__(model, "reward", loss_hparams, optim, reference=None)

    def compute_loss(self, batch: PackedBatch) -> LossOutput:
        scores = sequence_scores(self.policy, batch)
        rewards = None if batch.rewards is None else batch.rewards[:, :scores.shape[1]]  # ties are not ordered
        return self.spec(scores, lengths=batch.lengths, mask=batch.mask, rewards=rewards, **self.loss_hparams)


def split_heldout(examples: Sequence[RankedExample], fraction: float,
                  seed: int = 0) -> tuple[list[RankedExample], list[RankedExample]]:
    """(train, held-out): a seeded random ``fraction`` of the rankings held out (at least one when
    ``fraction`` > 0 and there are two or more rankings)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"reward_model.heldout_fraction must be in [0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(f"{seed}/heldout").shuffle(order)
    count = 0 if fraction == 0 or len(examples) < 2 else max(1, round(fraction * len(examples)))
    held = set(order[:count])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def ranking_labels(example: RankedExample, key: str | None = None) -> list[float]:
    """What a ranking says about its responses, higher better: ``meta[key]`` (e.g. ``gold_rewards``)
    when given, else the scores, else the positions (n - 1 - k)."""
    if key is not None:
        return [float(v) for v in example.meta[key]]
    if example.scores is not None:
        return [float(s) for s in example.scores]
    return [float(example.n - 1 - k) for k in range(example.n)]


def normalise_rewards(model, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int = 32) -> float:
    """Shift the rewards to mean 0 over every response of ``encoded`` (the training rankings): the mean
    raw reward is stored as ``model.config.reward_offset``, which ``sequence_scores`` subtracts.
    Returns the offset."""
    setattr(model.config, OFFSET_KEY, 0.0)
    rows = score_encoded(model, encoded, pad_id, batch_size)
    values = torch.cat(rows) if rows else torch.zeros(0)
    offset = float(values.mean()) if values.numel() else 0.0
    setattr(model.config, OFFSET_KEY, offset)
    return offset


SAVED_PAD = "<|reward_pad|>"


def save_reward_model(model, tokenizer, folder: str | Path) -> Path:
    """Save in Hugging Face format (sequence classification, ``reward_offset`` in config.json).

    Transformers' sequence-classification forward pools at the last token that is not the pad token. A
    tokenizer whose pad is its EOS (Llama's and Mistral's get pad = EOS, having none) would then pool at
    the token before the EOS, where alignexp did not train; such a model is saved with a pad token of its
    own (one embedding row added, never attended to), so that plain transformers scores at the EOS.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"pad_token": SAVED_PAD})
        model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
