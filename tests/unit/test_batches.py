"""The data order of training (alignexp.lightning_modules.datamodule.EpochBatches): one process sees exactly the batches
torch's shuffled DataLoader gave under Lightning; N ranks split each global batch; a resumed epoch skips what
was trained; and ``train.global_batch_size`` sets the accumulation."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from alignexp.args import TrainArgs
from alignexp.errors import ConfigError
from alignexp.lightning_modules.datamodule import EpochBatches, ResumableLoader
from alignexp.pipeline.fit import accumulation


class Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight, self.seen = torch.nn.Parameter(torch.zeros(1)), []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.flatten().long().tolist())
        return (self.weight * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _batches_under_lightning(loader, epochs: int) -> list[list[int]]:
    module = Recorder()
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", use_distributed_sampler=False).fit(module, loader)
    return module.seen


@pytest.mark.parametrize("n, batch_size", [(50, 16), (64, 16)])  # a shorter last batch, and none
def test_one_process_sees_the_batches_of_a_shuffled_dataloader(n, batch_size):
    """The order the runs before EpochBatches trained on (so their numbers stay as they were), epoch after epoch."""
    old = torch.utils.data.DataLoader(Indices(n), batch_size=batch_size, shuffle=True,
                                      generator=torch.Generator().manual_seed(3))
    new = ResumableLoader(Indices(n), batch_sampler=EpochBatches(n, batch_size, True, seed=3),
                          generator=torch.Generator())
    assert _batches_under_lightning(new, 3) == _batches_under_lightning(old, 3)


def test_ranks_split_each_global_batch_and_the_last_one_evenly():
    one = EpochBatches(22, 8, True, seed=0).batches(1)
    ranks = [EpochBatches(22, 4, True, seed=0, rank=r, world_size=2).batches(1) for r in range(2)]
    assert [len(b) for b in one] == [8, 8, 6] and [len(b) for b in ranks[0]] == [4, 4, 3]
    for k, global_batch in enumerate(one):  # rank 0 then rank 1: the one-process batch, in order
        assert ranks[0][k] + ranks[1][k] == global_batch
    last = [EpochBatches(5, 2, False, rank=r, world_size=4).batches(0) for r in range(4)]
    assert last == [[[0, 1]], [[2]], [[3]], [[4]]]  # 5 examples for 4 ranks: as evenly as they go
    few = [EpochBatches(3, 2, False, rank=r, world_size=4).batches(0) for r in range(4)]
    assert few == [[[0]], [[1]], [[2]], [[0]]]  # fewer examples than ranks: the last repeats the first


def test_a_resumed_epoch_skips_the_batches_trained_before_the_checkpoint():
    sampler = EpochBatches(20, 4, True, seed=5)
    sampler.set_epoch(1)
    sampler.position = 2
    state = sampler.state_dict()
    resumed = EpochBatches(20, 4, True, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # Lightning sets the same epoch again: the position stays
    assert list(resumed) == sampler.batches(1)[2:] and len(list(resumed)) == 3
    resumed.set_epoch(2)
    assert list(resumed) == sampler.batches(2)


def test_global_batch_size_sets_the_accumulation():
    assert accumulation(TrainArgs(batch_size=8, global_batch_size=32)) == 4
    assert accumulation(TrainArgs(batch_size=8, accumulate_grad_batches=3)) == 3
    with pytest.raises(ConfigError, match="train.global_batch_size=30 is not a multiple"):
        accumulation(TrainArgs(batch_size=8, global_batch_size=30))
