"""The loop end to end on the 2-layer model with fixed seeds: SFT, then DPO, then evaluation."""

from __future__ import annotations

import json

import torch

from alignexp.config import validate
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import encode_example, pack, sequence_logps
from alignexp.tasks.synthetic import SyntheticTask
from alignexp.train import run
from tests.conftest import TINY_RUN

PIPELINE = [*TINY_RUN, "task.n_train_prompts=256", "task.n_eval_prompts=96", "train.max_steps=-1",
            "train.max_epochs=2", "train.batch_size=16", "train.lr=5e-4"]


def heldout_nll(model, tokenizer, task: SyntheticTask) -> float:
    examples = task.sft_examples("eval")
    encoded = [encode_example(tokenizer, ex, 64, 64) for ex in examples]
    with torch.no_grad():
        batch = pack(encoded, pad_id=tokenizer.pad_token_id)
        logps, lengths, _ = sequence_logps(model, batch)
    return float(-logps[:, 0].sum() / lengths[:, 0].sum())


def test_sft_lowers_heldout_nll_and_dpo_beats_its_reference(compose):
    cfg = compose("loss=dpo", *PIPELINE)
    validate(cfg)
    record = run(cfg)
    out = cfg.paths.output_dir

    # SFT: the cached SFT policy (the reference) has a lower held-out NLL than the initial weights.
    task = SyntheticTask(n_sft=512)
    tokenizer = build_tokenizer(ModelArgs())
    initial = build_model(ModelArgs(arch=dict(cfg.model.arch)), tokenizer)
    reference = build_model(ModelArgs(path=record["init_from"]), tokenizer)
    assert heldout_nll(reference, tokenizer, task) < heldout_nll(initial, tokenizer, task) - 1.0

    # DPO: gold reward above the reference's by more than two standard errors, KL reported.
    saved = json.loads((__import__("pathlib").Path(out) / "eval.json").read_text())
    policy, ref = saved["policy"], saved["reference"]
    gap_stderr = (policy["gold_reward_stderr"] ** 2 + ref["gold_reward_stderr"] ** 2) ** 0.5
    assert policy["gold_reward"] > ref["gold_reward"] + 2 * gap_stderr
    assert policy["kl"] > 0 and saved["comparisons"]["win_rate_vs_reference"] > 0.5
    for key in ("task", "loss", "model", "n_prompts", "policy", "reference", "comparisons"):
        assert key in saved

    # DPO raises the implicit-reward accuracy on held-out rankings (0 at the start: all margins are 0).
    trained = build_model(ModelArgs(path=f"{out}/policy"), tokenizer)
    rng_task = SyntheticTask(n_train_prompts=96, tau=0.0)
    pairs = [ex for ex in rng_task.preference_examples(
        "eval", sample_fn=lambda prompts, n: [[ex.responses[0] for ex in task.sft_examples("eval")[:n]]
                                                for _ in prompts], n_responses=4)
             if ex.scores[0] > ex.scores[-1]]
    encoded = [encode_example(tokenizer, type(ex)(ex.prompt, [ex.responses[0], ex.responses[-1]]), 64, 64)
               for ex in pairs]
    with torch.no_grad():
        batch = pack(encoded, pad_id=tokenizer.pad_token_id)
        margin = (sequence_logps(trained, batch)[0] - sequence_logps(reference, batch)[0])
    accuracy = float((margin[:, 0] > margin[:, 1]).float().mean())
    assert accuracy > 0.7
