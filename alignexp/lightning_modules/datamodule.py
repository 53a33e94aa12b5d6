"""Datasets of encoded rankings and the collator that packs them (with cached reference log-probs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

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


def epoch_permutation(n: int, seed: int, epoch: int, batch_size: int) -> list[int]:
    """The order of epoch ``epoch`` of ``n`` examples: exactly the one torch's
    ``DataLoader(shuffle=True, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))`` yields
    in its epoch ``epoch`` under Lightning, computed from (seed, epoch) alone so that a resumed run finds it
    again. Each epoch that loader draws a base seed, then its ``RandomSampler`` a permutation, and, when
    the epoch ends on a shorter batch (the batch sampler runs the sampler to its end), one more that it
    discards; with full batches Lightning stops at the loader's length and it is never drawn."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        torch.randperm(n, generator=generator)
        if n % batch_size:
            torch.randperm(n, generator=generator)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


class EpochBatches(Sampler[list[int]]):
    """One rank's batches of each epoch, resumable mid-epoch.

    The epoch's order (:func:`epoch_permutation`, or 0..n-1 without ``shuffle``) is cut into global
    batches of ``batch_size x world`` examples, and rank r takes the r-th ``batch_size`` of each: the
    ranks together see exactly the batches one process would see at ``batch_size x world``, so N
    ranks at batch b follow the optimisation of one process at N x b. The last, shorter global batch is
    split as evenly as the ranks allow (a rank left with none repeats the epoch's first examples, as
    torch's ``DistributedSampler`` pads). ``position`` batches of epoch ``epoch`` are skipped: the state a
    checkpoint saves (:meth:`state_dict`) and a resumed run loads.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return -(-self.n // (self.batch_size * self.world_size))

    @property
    def sampler(self) -> EpochBatches:
        """Itself: Lightning calls ``set_epoch`` on a batch sampler's ``sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def batches(self, epoch: int) -> list[list[int]]:
        size = self.batch_size * self.world_size
        order = epoch_permutation(self.n, self.seed, epoch, size) if self.shuffle else list(range(self.n))
        out = []
        for start in range(0, self.n, size):
            chunk = order[start:start + size]
            if len(chunk) == size:
                out.append(chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
                continue
            if len(chunk) < self.world_size:
                chunk = chunk + order[:self.world_size - len(chunk)]
            share, extra = divmod(len(chunk), self.world_size)
            first = self.rank * share + min(self.rank, extra)
            out.append(chunk[first:first + share + (self.rank < extra)])
        return out

    def __iter__(self):
        yield from self.batches(self.epoch)[self.position:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ResumableLoader(DataLoader):
    """A DataLoader over :class:`EpochBatches` that Lightning saves in and restores from a checkpoint (its
    ``state_dict``: the epoch and how many of its batches were trained on)."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def make_loader(dataset: RankingDataset, batch_size: int, pad_id: int, shuffle: bool, seed: int = 0,
                with_target: bool = False) -> ResumableLoader:
    """This rank's loader of ``dataset``: ``batch_size`` examples per batch, in the order of :class:`EpochBatches`
    (the one ``DataLoader(shuffle=shuffle, generator=manual_seed(seed))`` has on one process)."""
    from alignexp.distributed import rank, world_size

    batches = EpochBatches(len(dataset), batch_size, shuffle, seed, rank(), world_size())
    # Its own generator for the base seed a DataLoader draws each epoch, so the global RNG is left alone.
    return ResumableLoader(dataset, batch_sampler=batches, collate_fn=Collator(pad_id, with_target), num_workers=0,
                           generator=torch.Generator())
