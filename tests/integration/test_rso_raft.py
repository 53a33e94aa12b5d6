"""RSO, RAFT and self-bootstrapping through train.py on the tiny synthetic run: RSO's accepted samples have a
higher gold reward than the SFT candidates they came from; RAFT's rounds raise the policy's gold reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import alignexp.pipeline as pipeline
import alignexp.train as train_module
from alignexp.config import validate
from tests.conftest import TINY_RUN

RUN = [*TINY_RUN, "hardware.threads=1", "task.n_train_prompts=64", "task.n_eval_prompts=64",
       "train.max_steps=-1", "train.batch_size=16"]


@pytest.fixture
def built(monkeypatch) -> list:
    """The samplers the pipeline builds, kept for their per-round figures (``history``)."""
    samplers: list = []
    instantiate = pipeline.instantiate_target

    def build_and_keep(config, key, **kwargs):
        built = instantiate(config, key, **kwargs)
        if key == "sampler":
            samplers.append(built)
        return built

    monkeypatch.setattr(pipeline, "instantiate_target", build_and_keep)
    return samplers


def eval_json(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "eval.json").read_text())


def test_rso_accepts_better_samples_and_trains(compose, built):
    cfg = compose("experiment=rso", "pairs=tournament", *RUN, "sampler.num_candidates=8", "sampler.num_samples=4",
                  "train.max_epochs=2")
    validate(cfg)
    assert cfg.sampler.name == "rso" and cfg.loss.name == "dpo"
    train_module.run(cfg)
    figures = built[0].history[0]
    print(f"RSO: mean gold reward of SFT candidates {figures['candidates_reward']:.3f}, "
          f"of accepted samples {figures['accepted_reward']:.3f}")
    assert figures["accepted_reward"] > figures["candidates_reward"] + 0.02
    assert figures["prompts"] == 64
    saved = eval_json(cfg)
    assert saved["loss"] == "dpo" and saved["policy"]["kl"] > 0


def test_raft_rounds_raise_the_policys_gold_reward(compose, built):
    cfg = compose("experiment=raft", *RUN, "sampler.iterations=2", "sampler.num_candidates=8", "train.max_epochs=4",
                  "train.lr=1e-3", "train.warmup_steps=2")
    validate(cfg)
    train_module.run(cfg)
    history = built[0].history
    print("RAFT: mean gold reward of the current policy's samples per round: "
          + ", ".join(f"{h['candidates_reward']:.3f} (kept {h['kept_reward']:.3f})" for h in history))
    assert len(history) == 2 and history[1]["candidates_reward"] > history[0]["candidates_reward"]
    saved = eval_json(cfg)
    policy, reference = saved["policy"], saved["reference"]
    print(f"RAFT eval: gold reward {policy['gold_reward']:.3f} ± {policy['gold_reward_stderr']:.3f}, "
          f"SFT {reference['gold_reward']:.3f} ± {reference['gold_reward_stderr']:.3f}")
    gap_stderr = (policy["gold_reward_stderr"] ** 2 + reference["gold_reward_stderr"] ** 2) ** 0.5
    assert policy["gold_reward"] > reference["gold_reward"] + 2 * gap_stderr


def test_self_bootstrap_with_pro_runs(compose, built):
    cfg = compose("experiment=self_bootstrap", *RUN, "task.n_train_prompts=32", "sampler.rounds=2",
                  "train.max_steps=2")
    validate(cfg)
    record = train_module.run(cfg)
    history = built[0].history
    assert [h["round"] for h in history] == [0, 1] and all(h["rankings"] == 32 for h in history)
    assert record["loss"] == "pro"
