"""Resumable training: a run killed with SIGKILL mid-epoch after a checkpoint and resumed in its folder ends
with the weights of the uninterrupted run, bit for bit; a preemption signal saves a checkpoint, requeues the
SLURM job and stops, and the resumed fit ends where the uninterrupted one does."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch

from tests.conftest import REPO
from tests.distributed.conftest import FAST, check, train, weights

# 32 rankings in batches of 4: 8 steps an epoch, 16 in all; a checkpoint every 2 steps.
SCHEDULE = [*FAST, "hardware=cpu", "train.max_steps=-1", "train.max_epochs=2", "train.batch_size=4",
            "train.checkpoint_every=2", "train.warmup_steps=3", "eval.enabled=false"]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    """Killed at step 11 (epoch 1, batch 3 of 8), one step after the checkpoint of step 10: the resumed run
    restores weights, AdamW moments, the warmup schedule and the data order (epoch 1's permutation from
    its 3rd batch), and its final policy equals the uninterrupted run's exactly."""
    cache, whole, killed = tmp_path / "cache", tmp_path / "whole", tmp_path / "killed"
    check(train(*SCHEDULE, f"hydra.run.dir={whole}", cache=cache))
    result = train("11", *SCHEDULE, f"hydra.run.dir={killed}", cache=cache,
                   script=str(REPO / "tests" / "distributed" / "kill_at_step.py"))
    assert result.returncode == -signal.SIGKILL
    assert not (killed / "policy").exists()
    state = torch.load(killed / "checkpoints" / "train" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 10 and state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "position": 2}]
    resumed = check(train(f"resume={killed}", cache=cache))
    assert "train: resuming from" in resumed.stdout
    final, expected = weights(killed / "policy"), weights(whole / "policy")
    assert set(final) == set(expected) and all(torch.equal(final[k], expected[k]) for k in expected)
    assert "train: global batch 4 = 4 per device x 1 process(es)" in resumed.stdout


class SignalAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning, arriving during a step


def _fit(out, *callbacks):
    from alignexp.args import HardwareArgs, OptimArgs
    from alignexp.lightning_modules.datamodule import RankingDataset, make_loader
    from alignexp.lightning_modules.preference import PreferenceModule
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.logprobs import EncodedExample
    from alignexp.models.tokenizer import build_byte_tokenizer
    from alignexp.pipeline.fit import fit

    tokenizer = build_byte_tokenizer()
    policy = build_model(ModelArgs(arch={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 1, "num_attention_heads": 2}), tokenizer)
    generator = torch.Generator().manual_seed(0)
    encoded = [EncodedExample(torch.randint(3, 250, (6,), generator=generator).tolist(),
                              [torch.randint(3, 250, (3,), generator=generator).tolist() for _ in range(2)])
               for _ in range(12)]
    loader = make_loader(RankingDataset(encoded, [torch.tensor([-20.0, -21.0])] * 12), 2, tokenizer.pad_token_id,
                         shuffle=True, seed=1)
    module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=1e-2, warmup_steps=2))
    fit(module, loader, hw=HardwareArgs(threads=1), logger={}, out=out, stage="train", max_steps=9, max_epochs=2,
        enable_progress_bar=False, callbacks=list(callbacks))
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_a_preemption_signal_saves_requeues_and_the_resumed_fit_matches(tmp_path, monkeypatch):
    """SIGUSR1 during step 4 (SLURM's ``--signal=USR1@...``): the ranks save ``last.ckpt`` at the end of that step,
    rank 0 runs ``scontrol requeue <job>``, the fit stops with Preempted; fitting again in the same folder
    resumes (mid-epoch, 6 batches an epoch) and ends with the weights of a fit that was never interrupted."""
    from alignexp.pipeline.fit import Preempted

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted, match="checkpoint"):
        _fit(tmp_path / "run", SignalAtStep(4))
    assert signal.getsignal(signal.SIGUSR1) is before  # the handler the run found is back
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "train" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5  # noted during step 4, saved when it ended (steps count from 0)
    resumed = _fit(tmp_path / "run")
    uninterrupted = _fit(tmp_path / "other")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
