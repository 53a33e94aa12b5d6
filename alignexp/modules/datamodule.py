"""Datasets of encoded rankings and the collator that packs them (with cached reference log-probs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from alignexp.models.logprobs import EncodedExample, PackedBatch, encode_example, pack
from alignexp.tasks.base import RankedExample, SampledText


class RankingDataset(Dataset):
    """Encoded examples, each optionally with its precomputed reference log-probs (n,)."""

    def __init__(self, encoded: Sequence[EncodedExample], ref_logps: Sequence[Tensor] | None = None):
        if ref_logps is not None and len(ref_logps) != len(encoded):
            raise ValueError("one row of reference log-probs per example")
        self.encoded, self.ref_logps = list(encoded), (list(ref_logps) if ref_logps is not None else None)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[EncodedExample, Tensor | None]:
        return self.encoded[index], (self.ref_logps[index] if self.ref_logps is not None else None)


def encode_all(tokenizer, examples: Sequence[RankedExample], max_prompt_len: int, max_response_len: int,
               with_target: bool = False) -> list[EncodedExample]:
    """Tokenise every example; a sampled response (:class:`SampledText`) keeps the tokens that were sampled."""
    out = []
    for ex in examples:
        encoded = encode_example(tokenizer, ex, max_prompt_len, max_response_len, with_target)
        for j, response in enumerate(ex.responses):
            if isinstance(response, SampledText):
                encoded.response_ids[j] = list(response.token_ids[:max_response_len])
        out.append(encoded)
    return out


class Collator:
    """Packs a list of (encoded, ref_logps) into a :class:`PackedBatch` with ``ref_logps`` attached."""

    def __init__(self, pad_id: int, with_target: bool = False):
        self.pad_id, self.with_target = pad_id, with_target

    def __call__(self, items: list[tuple[EncodedExample, Tensor | None]]) -> PackedBatch:
        batch = pack([e for e, _ in items], pad_id=self.pad_id, with_target=self.with_target)
        refs = [r for _, r in items]
        if all(r is not None for r in refs):
            b, n = batch.lengths.shape
            ref = torch.zeros(b, n)
            for i, r in enumerate(refs):
                ref[i, :len(r)] = r
            batch.ref_logps = ref
        return batch


def make_loader(dataset: RankingDataset, batch_size: int, pad_id: int, shuffle: bool, seed: int = 0,
                with_target: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=Collator(pad_id, with_target), num_workers=0)
