"""Invariants of training: gradient accumulation (batch 16 equals 2 x 8 accumulated, float64), and a pinned
trajectory (20 steps of DPO on committed rankings: the losses must not move, so a silent numerical change
anywhere in tokenisation, packing, log-probs, the loss or the optimiser is caught).

Regenerate the pinned values after an intended change with
``python -m tests.integration.test_invariants --write`` and say why in the commit.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from alignexp.args import HardwareArgs, ModelArgs, OptimArgs
from alignexp.config import CONF_DIR
from alignexp.lightning_modules.datamodule import RankingDataset, encode_all, make_loader
from alignexp.lightning_modules.preference import PreferenceModule
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample
from alignexp.pipeline.fit import fit
from alignexp.tasks.base import RankedExample
from alignexp.tasks.synthetic import SyntheticTask

PINNED = Path(__file__).resolve().parents[1] / "fixtures" / "pinned"


def tiny(tokenizer, dtype: torch.dtype = torch.float32):
    fields = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml"))
    return build_model(ModelArgs(**fields), tokenizer).to(dtype)


# -- gradient accumulation ----------------------------------------------------------------------------------
def random_pairs(count: int, vocab: int, seed: int = 0) -> tuple[list[EncodedExample], list[torch.Tensor]]:
    rng = random.Random(seed)
    encoded = [EncodedExample([rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))],
                              [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))] for _ in range(2)])
               for _ in range(count)]
    refs = [torch.tensor([rng.uniform(-30, -5), rng.uniform(-30, -5)]) for _ in range(count)]
    return encoded, refs


@pytest.mark.parametrize("loss", ["dpo", "ranked_dpo"])
def test_batch_16_equals_2_x_8_accumulated(tmp_path, loss):
    """Two optimizer steps on 32 pairs: one batch of 16 per step, or two micro-batches of 8 accumulated
    (Lightning scales each micro-batch's mean loss by 1/2), in float64: the same weights to 1e-6."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(ModelArgs())
    start = tiny(tokenizer, torch.float64)
    encoded, refs = random_pairs(32, len(tokenizer))
    hw = HardwareArgs(precision="64-true", threads=1)
    finals = []
    for batch_size, accumulate in ((16, 1), (8, 2)):
        policy = copy.deepcopy(start)
        module = PreferenceModule(policy, loss, {"beta": 0.1}, OptimArgs(lr=1e-3, warmup_steps=0))
        loader = make_loader(RankingDataset(encoded, refs), batch_size, tokenizer.pad_token_id, shuffle=False)
        fit(module, loader, hw=hw, logger={}, out=tmp_path / f"b{batch_size}", stage="train", max_steps=2,
            max_epochs=1, accumulate_grad_batches=accumulate, gradient_clip_val=1.0, enable_progress_bar=False)
        finals.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
    moved = max((finals[0][k] - start.state_dict()[k]).abs().max().item() for k in finals[0])
    gap = max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[0])
    print(f"{loss}: largest weight change {moved:.3e}, largest gap between the two {gap:.3e}")
    assert moved > 1e-4  # training happened
    assert gap < 1e-6


# -- the pinned trajectory ----------------------------------------------------------------------------------
def make_rankings(count: int = 160) -> list[RankedExample]:
    """Pairs of two demonstrations of the synthetic language per prompt, ranked by its gold reward."""
    task = SyntheticTask(seed=0, n_train_prompts=count)
    rng = random.Random("pinned")
    out = []
    for prompt in task.prompts("train"):
        a, b = task._demonstration(rng, prompt), task._demonstration(rng, prompt)
        ra, rb = task.gold_reward(prompt, a), task.gold_reward(prompt, b)
        better, worse = (a, b) if ra >= rb else (b, a)
        out.append(RankedExample(prompt, [better, worse], [max(ra, rb), min(ra, rb)]))
    return out


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def dpo_trajectory(out: Path, steps: int = 20) -> list[float]:
    """The per-step training losses of 20 steps of DPO (beta 0.1, batch 8, a frozen reference) from the
    tiny model on the committed rankings, in their committed order."""
    torch.manual_seed(0)
    rankings = [RankedExample(**json.loads(line)) for line in (PINNED / "rankings.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer(ModelArgs())
    policy = tiny(tokenizer)
    reference = copy.deepcopy(policy)
    encoded = encode_all(tokenizer, rankings, 64, 32)
    module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=5e-4, warmup_steps=5), reference=reference)
    recorder = LossRecorder()
    fit(module, make_loader(RankingDataset(encoded), 8, tokenizer.pad_token_id, shuffle=False),
        hw=HardwareArgs(threads=1), logger={}, out=out, stage="train", max_steps=steps, max_epochs=1,
        gradient_clip_val=1.0, callbacks=[recorder], enable_progress_bar=False)
    return recorder.losses


def test_pinned_dpo_trajectory(tmp_path):
    expected = json.loads((PINNED / "dpo_losses.json").read_text())["losses"]
    losses = dpo_trajectory(tmp_path)
    assert len(losses) == len(expected) == 20
    assert losses[-1] < losses[0]  # it learns
    assert losses == pytest.approx(expected, rel=1e-4)


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    torch.set_num_threads(1)
    PINNED.mkdir(parents=True, exist_ok=True)
    if not (PINNED / "rankings.jsonl").exists():
        (PINNED / "rankings.jsonl").write_text("".join(json.dumps(ex.__dict__) + "\n" for ex in make_rankings()))
    with tempfile.TemporaryDirectory() as folder:
        values = dpo_trajectory(Path(folder))
    (PINNED / "dpo_losses.json").write_text(json.dumps({"losses": values}, indent=1) + "\n")
    print(values)


# -- dropout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_lora_dropout", [False, True])
def test_preference_training_runs_without_dropout(compose, keep_lora_dropout):
    """A backbone built with attention dropout 0.1 and LoRA dropout 0.1: after the run's models stage, two
    train-mode forwards give equal log-probs, unless LoRA's dropout is kept on purpose."""
    import alignexp.pipeline as pipeline
    from alignexp.config import build_task, validate
    from alignexp.losses import get_loss
    from alignexp.models.logprobs import pack, sequence_logps
    from alignexp.pipeline.context import RunContext

    cfg = compose("loss=dpo", "+model.arch.attention_dropout=0.1", "model.lora={r: 4, dropout: 0.1}",
                  f"train.keep_lora_dropout={keep_lora_dropout}", "init_from=null")
    args = validate(cfg)
    ctx = RunContext(args=args, task=build_task(args.task), spec=get_loss("dpo"), sampler=None)
    pipeline.models(ctx)
    for name, module in ctx.policy.named_modules():  # the adapters start at 0: give them a value to drop
        if name.endswith("lora_B.default"):
            torch.nn.init.normal_(module.weight, std=0.1)
    ctx.policy.train()
    batch = pack([EncodedExample([5, 6, 7, 8], [[9, 10, 11], [12, 13]])], pad_id=ctx.tokenizer.pad_token_id)
    first, second = sequence_logps(ctx.policy, batch)[0], sequence_logps(ctx.policy, batch)[0]
    assert torch.equal(first, second) != keep_lora_dropout
