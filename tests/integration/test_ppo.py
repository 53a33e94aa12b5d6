"""PPO on the 2-layer model (fixed initial weights): per-token log-probs, a few PPO steps with finite
metrics, exact resumption, the safety nets, and the memory options (critic, LoRA-off reference,
reward model on or off the device). Each run is a few steps of 4 prompts with 6 new tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from alignexp.judges.reward_model import build_reward_model
from alignexp.losses import LossOutput, get_loss
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample, pack, response_states, sequence_logps, token_logps
from alignexp.models.lora import LoraArgs, apply_lora
from alignexp.modules.ppo import PPOArgs, PPOInstabilityError, RewardModelScorer, to_rows, train_ppo
from alignexp.tasks.synthetic import SyntheticTask

TINY = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}
SMALL = {"rollout_batch_size": 4, "ppo_epochs": 2, "n_minibatches": 2, "max_new_tokens": 6, "checkpoint_every": 0}
METRICS = ("score", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "loss_value", "loss_policy",
           "explained_variance", "response_length")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs())


def tiny_model(tokenizer):
    config = yaml.safe_load(TINY.read_text())
    return build_model(ModelArgs(**config), tokenizer)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(n_sft=8, n_train_prompts=16, n_eval_prompts=4)


def run(tokenizer, task, out: Path, **settings) -> tuple[list[dict[str, float]], torch.nn.Module]:
    torch.manual_seed(0)
    policy = tiny_model(tokenizer)
    reference = tiny_model(tokenizer).requires_grad_(False).eval()
    history = train_ppo(policy, reference, tokenizer, task, PPOArgs(**{**SMALL, **settings}), out, TRAINER, seed=3)
    return history, policy


def test_token_logps_sum_to_sequence_logps(tokenizer):
    model = tiny_model(tokenizer)
    batch = pack([EncodedExample([257, 97, 98], [[99, 100, 258], [101, 258]]),
                  EncodedExample([257, 100], [[97, 258]])], pad_id=tokenizer.pad_token_id)
    per_token = token_logps(model, batch)
    assert per_token.shape == (7,)  # 3 + 2 + 2 response tokens
    summed, lengths, mask = sequence_logps(model, batch)
    expected = torch.zeros(4).index_add(0, batch.slot, per_token).view(2, 2)
    torch.testing.assert_close(summed, expected)
    assert lengths.tolist() == [[3, 2], [2, 0]] and summed[1, 1] == 0
    torch.testing.assert_close(token_logps(model, batch, response_states(model, batch)), per_token)


def test_to_rows_puts_each_token_at_its_response_position(tokenizer):
    batch = pack([EncodedExample([257, 97], [[1, 2, 3]]), EncodedExample([257], [[4]]),
                  EncodedExample([257, 98, 99], [[5, 6]])], n=1, pad_id=tokenizer.pad_token_id)
    mask = torch.arange(3)[None] < batch.lengths[:, :1]
    order = torch.randperm(len(batch.slot), generator=torch.Generator().manual_seed(0))
    shuffled = type(batch)(**{**batch.__dict__, "slot": batch.slot[order], "source_index": batch.source_index[order],
                              "target_ids": batch.target_ids[order]})
    rows = to_rows(shuffled.target_ids.float(), shuffled, mask)
    assert rows.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]


def test_ppo_steps_are_finite_and_a_resumed_run_equals_an_uninterrupted_one(tokenizer, task, tmp_path):
    full, full_policy = run(tokenizer, task, tmp_path / "full", steps=3)
    assert [h["iteration"] for h in full] == [0, 1, 2]
    for metrics in full:
        for name in METRICS:
            assert name in metrics and (math.isfinite(metrics[name]) or name == "explained_variance"), name
    assert full[0]["kl"] == 0.0  # the policy starts as its reference
    assert full[1]["kl"] != 0.0 and full[1]["approx_kl"] > 0  # and moves

    first, _ = run(tokenizer, task, tmp_path / "first", steps=2)
    checkpoint = tmp_path / "first" / "checkpoints" / "ppo-last.pt"
    assert checkpoint.is_file()
    resumed, resumed_policy = run(tokenizer, task, tmp_path / "resumed", steps=3, resume_from=str(checkpoint))
    assert first == full[:2]
    assert resumed == full  # the history continues, and step 2 is the uninterrupted run's, exactly
    for (name, a), b in zip(full_policy.state_dict().items(), resumed_policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_kl_past_max_kl_stops_with_a_message_naming_the_setting(tokenizer, task, tmp_path):
    with pytest.raises(PPOInstabilityError, match=r"iteration 1: the KL to the reference .* past loss.max_kl=1e-06"):
        run(tokenizer, task, tmp_path, steps=2, max_kl=1e-6)


def test_nan_loss_or_reward_stops_the_run(tokenizer, task, tmp_path, monkeypatch):
    ppo = get_loss("ppo")

    def nan_loss(*args, **kwargs) -> LossOutput:
        out = ppo(*args, **kwargs)
        return LossOutput(out.loss * float("nan"), out.metrics)

    with monkeypatch.context() as patch:
        patch.setattr("alignexp.modules.ppo.get_loss", lambda name: nan_loss)
        with pytest.raises(PPOInstabilityError, match="iteration 0: the loss is nan"):
            run(tokenizer, task, tmp_path / "loss", steps=1)
    monkeypatch.setattr(type(task), "gold_reward", lambda self, prompt, response: float("nan"))
    with pytest.raises(PPOInstabilityError, match="iteration 0: the reward is not finite for 4 of 4 responses"):
        run(tokenizer, task, tmp_path / "reward", steps=1)


def test_critic_and_lora_off_reference(tokenizer, task, tmp_path):
    """A separate critic trains; with reference=lora_off the reference is the base model (LoRA off)."""
    history, _ = run(tokenizer, task, tmp_path / "critic", steps=1, value_model="critic")
    assert math.isfinite(history[0]["loss_value"])

    base = tiny_model(tokenizer)
    policy = apply_lora(tiny_model(tokenizer), LoraArgs(r=4, dropout=0.0))
    # 16 new tokens: the random bytes of an untrained model score 0 more often than not (few of them carry
    # sentiment), and 4 rollouts of 6 tokens that all score 0 give the adapters nothing to learn from.
    history = train_ppo(policy, None, tokenizer, task, PPOArgs(**{**SMALL, "max_new_tokens": 16}, steps=2,
                                                               reference="lora_off"), tmp_path / "lora", TRAINER)
    assert history[1]["kl"] != 0.0  # the adapters moved the policy away from its reference
    batch = pack([EncodedExample([257, 97], [[98, 99, 258]])], pad_id=tokenizer.pad_token_id)
    with torch.no_grad(), policy.disable_adapter():
        torch.testing.assert_close(token_logps(policy, batch), token_logps(base, batch))
    with pytest.raises(ValueError, match="loss.reference=lora_off needs a LoRA"):
        train_ppo(tiny_model(tokenizer), None, tokenizer, task, PPOArgs(**SMALL, reference="lora_off"),
                  tmp_path / "nolora", TRAINER)


@pytest.mark.parametrize("offload", [False, True])
def test_reward_model_scores_the_rollouts(tokenizer, task, tmp_path, offload):
    """A reward model folder (as loss=reward saves it) is the reward, kept on the device or offloaded;
    its scores are Hugging Face's own sequence-classification forward on [prompt | response]."""
    config = yaml.safe_load(TINY.read_text())
    reward_model = build_reward_model(ModelArgs(**{**config, "init_seed": 1}), tokenizer).eval()
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"), offload=offload)
    prompts, responses = ["abc:", "d:"], ["ef", ""]
    with torch.no_grad():  # one at a time, unpadded: BOS + prompt, response + EOS
        expected = [float(reward_model(input_ids=torch.tensor([[257, *p.encode(), *r.encode(), 258]])).logits[0, 0])
                    for p, r in zip(prompts, responses)]
    torch.testing.assert_close(scorer(prompts, responses, [], []), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    history, _ = run(tokenizer, task, tmp_path / "ppo", steps=1, reward_source="reward_model",
                     reward_model_path=str(tmp_path / "rm"), offload_reward_model=offload)
    assert math.isfinite(history[0]["score"]) and history[0]["score"] != 0.0
    with pytest.raises(ValueError, match="loss.reward_model_path=.*no reward model could be loaded"):
        RewardModelScorer(str(tmp_path / "missing"))
