"""PPO on the 2-layer model (fixed initial weights), run as the pipeline's ``ppo`` stage: per-token log-probs,
rollouts at temperature, a few PPO steps with finite metrics, exact resumption, the safety nets, dropout
off, and the memory options (critic, LoRA-off reference, reward model on or off the device). Each run is
a few steps of 4 prompts with 6 new tokens."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from alignexp.args import (
    EvalArgs,
    HardwareArgs,
    LossArgs,
    ModelArgs,
    PPOArgs,
    RewardModelArgs,
    RunArgs,
    SFTArgs,
    TrainArgs,
)
from alignexp.errors import ConfigError
from alignexp.judges import GoldJudge, build_judge
from alignexp.judges.reward_model import build_reward_model
from alignexp.lightning_modules.ppo import PPOInstabilityError, PPOModule, to_rows
from alignexp.losses import LossOutput, get_loss
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample, pack, response_states, sequence_logps, token_logps
from alignexp.models.lora import AdaptersOff, LoraArgs, apply_lora
from alignexp.pipeline.context import RunContext
from alignexp.pipeline.ppo import ppo
from alignexp.sampling.engine import SamplingParams, sample_next, stream_keys, stream_uniforms
from alignexp.sampling.text import sample_seed
from alignexp.tasks.synthetic import SyntheticTask

TINY = Path(__file__).resolve().parents[2] / "conf" / "model" / "tiny.yaml"
SMALL = {"rollout_batch_size": 4, "ppo_epochs": 2, "n_minibatches": 2, "max_new_tokens": 6, "checkpoint_every": 0}
METRICS = ("score", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "loss_value", "loss_policy",
           "explained_variance", "response_length")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs())


def tiny_model(tokenizer, **arch):
    config = yaml.safe_load(TINY.read_text())
    config["arch"] = {**config["arch"], **arch}
    return build_model(ModelArgs(**config), tokenizer)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(n_sft=8, n_train_prompts=16, n_eval_prompts=4)


def run_args(out: Path, ppo_settings: dict, **sections) -> RunArgs:
    """The run's arguments as ``config.validate`` gives them: the tiny model, the CPU, loss=ppo."""
    values = {"model": ModelArgs(**yaml.safe_load(TINY.read_text())), "hardware": HardwareArgs(),
              "loss": LossArgs("ppo", {}), "train": TrainArgs(), "sft": SFTArgs(), "eval": EvalArgs(),
              "ppo": PPOArgs(**{**SMALL, **ppo_settings}), "reward_model": RewardModelArgs(), "task": {},
              "sampler": {}, "judge": {"name": "auto"}, "logger": {}, "output_dir": out, "cache_dir": out / "cache",
              "seed": 3, **sections}
    return RunArgs(**{f.name: values[f.name] for f in dataclasses.fields(RunArgs) if f.name in values})


def run(tokenizer, task, out: Path, policy=None, reference=None, **settings) -> tuple[list[dict], torch.nn.Module]:
    """The ppo stage on a run context whose policy and reference are the tiny model; returns the history
    (read back from the final checkpoint) and the trained policy."""
    torch.manual_seed(0)
    policy = policy if policy is not None else tiny_model(tokenizer)
    reference = reference if reference is not None else tiny_model(tokenizer).requires_grad_(False).eval()
    ctx = RunContext(args=run_args(out, settings), task=task, spec=get_loss("ppo"), sampler=None,
                     tokenizer=tokenizer, policy=policy, reference=reference)
    ppo(ctx)
    state = torch.load(out / "checkpoints" / "ppo-last.pt", weights_only=False)
    return state["history"], policy


def module(tokenizer, task, policy, reference, **settings) -> PPOModule:
    return PPOModule(policy, reference, tokenizer, task.prompts("train"), GoldJudge(task),
                     PPOArgs(**{**SMALL, **settings}), seed=3)


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


def test_rollout_log_probs_and_kl_are_those_of_the_tempered_distributions(tokenizer, task):
    """At T = 0.5 each sampled token is the draw, with the prompt's seed, from softmax(logits / T) of a plain
    forward of the policy, and the rollout's old log-prob is log softmax(logits / T) at that token (not the
    T = 1 log-prob). The KL logged is sum_t log pi_T(y_t) - log pi_ref,T(y_t): both tempered, as TRL does."""
    temperature = 0.5
    policy, reference = tiny_model(tokenizer), tiny_model(tokenizer, initializer_range=0.05)
    ppo_module = module(tokenizer, task, policy, reference.requires_grad_(False).eval(), temperature=temperature,
                        max_new_tokens=8)
    prompt_index = [3, 0, 7, 12]
    rollout, metrics = ppo_module.rollout(5, prompt_index)

    def logits_of(model, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].float()

    kl, untempered_gap = [], 0.0
    for b, (example, i) in enumerate(zip(rollout.encoded, prompt_index)):
        prompt, response = example.prompt_ids, example.response_ids[0]
        steps = range(len(prompt) - 1, len(prompt) + len(response) - 1)
        logits = logits_of(policy, prompt + response)[list(steps)]
        tempered = torch.log_softmax(logits / temperature, dim=-1)
        keys = stream_keys([sample_seed(3 * 1_000_003 + 5, i, 0)])  # the prompt's random stream
        params = SamplingParams(temperature=temperature, max_new_tokens=8)
        for t, token in enumerate(response):  # the engine's draw from softmax(logits / T), step by step
            assert int(sample_next(logits[t:t + 1], params, stream_uniforms(keys, t))[0][0]) == token
        expected = tempered.gather(1, torch.tensor(response)[:, None]).squeeze(1)
        torch.testing.assert_close(rollout.logprobs[b, :len(response)], expected, rtol=0, atol=2e-5)
        assert rollout.mask[b].sum() == len(response)
        untempered = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        untempered_gap = max(untempered_gap, float((untempered - expected).abs().max()))
        ref = torch.log_softmax(logits_of(reference, prompt + response)[list(steps)] / temperature, dim=-1)
        kl.append(float((expected - ref.gather(1, torch.tensor(response)[:, None]).squeeze(1)).sum()))
    assert untempered_gap > 0.1  # T = 0.5 changes the log-probs: the check above can fail
    assert metrics["kl"] == pytest.approx(sum(kl) / len(kl), abs=1e-4) and abs(metrics["kl"]) > 1e-3


def test_ppo_steps_are_finite_and_a_resumed_run_equals_an_uninterrupted_one(tokenizer, task, tmp_path):
    full, full_policy = run(tokenizer, task, tmp_path / "full", steps=3, temperature=0.7)
    assert [h["iteration"] for h in full] == [0, 1, 2]
    for metrics in full:
        for name in METRICS:
            assert name in metrics and (math.isfinite(metrics[name]) or name == "explained_variance"), name
    assert full[0]["kl"] == 0.0  # the policy starts as its reference
    assert full[1]["kl"] != 0.0 and full[1]["approx_kl"] > 0  # and moves

    first, _ = run(tokenizer, task, tmp_path / "first", steps=2, temperature=0.7)
    checkpoint = tmp_path / "first" / "checkpoints" / "ppo-last.pt"
    resumed, resumed_policy = run(tokenizer, task, tmp_path / "resumed", steps=3, temperature=0.7,
                                  resume_from=str(checkpoint))
    assert first == full[:2]
    assert resumed == full  # the history continues, and step 2 is the uninterrupted run's, exactly
    for (name, a), b in zip(full_policy.state_dict().items(), resumed_policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_kl_past_max_kl_stops_with_a_message_naming_the_setting(tokenizer, task, tmp_path):
    with pytest.raises(PPOInstabilityError, match=r"iteration 1: the KL to the reference .* past ppo.max_kl=1e-06"):
        run(tokenizer, task, tmp_path, steps=2, max_kl=1e-6)


def test_nan_loss_or_reward_stops_the_run(tokenizer, task, tmp_path, monkeypatch):
    loss = get_loss("ppo")

    def nan_loss(*args, **kwargs) -> LossOutput:
        out = loss(*args, **kwargs)
        return LossOutput(out.loss * float("nan"), out.metrics)

    with monkeypatch.context() as patch:
        patch.setattr("alignexp.lightning_modules.ppo.get_loss", lambda name: nan_loss)
        with pytest.raises(PPOInstabilityError, match="iteration 0: the loss is nan"):
            run(tokenizer, task, tmp_path / "loss", steps=1)
    monkeypatch.setattr(type(task), "gold_reward", lambda self, prompt, response: float("nan"))
    with pytest.raises(PPOInstabilityError, match="iteration 0: the reward is not finite for 4 of 4 responses "
                                                  r"\(ppo.judge=gold\)"):
        run(tokenizer, task, tmp_path / "reward", steps=1)


def test_the_stage_refuses_what_it_cannot_run(tokenizer, task, tmp_path):
    with pytest.raises(ConfigError, match="ppo.judge: task 'synthetic' has no gold reward .*judge@ppo.judge"):
        run(tokenizer, task, tmp_path, judge={"name": "none"})
    with pytest.raises(ConfigError, match="ppo.rollout_batch_size=32 is more than the task's 16 training prompts"):
        run(tokenizer, task, tmp_path, rollout_batch_size=32)
    for name, strategy in (("fsdp", "fsdp"), ("deepspeed_zero3", "deepspeed")):
        hardware = HardwareArgs(name=name, accelerator="cpu", devices=2, strategy=strategy,
                                **({"zero_stage": 3} if strategy == "deepspeed" else {}))
        ctx = RunContext(args=run_args(tmp_path, {}, hardware=hardware), task=task, spec=get_loss("ppo"), sampler=None)
        with pytest.raises(ConfigError, match=f"hardware={name}: the ppo stage runs on one device or under DDP .*"
                                              f"strategy '{strategy}' shards what it trains"):
            ppo(ctx)
    hardware = HardwareArgs(name="ddp", accelerator="cpu", devices=4, strategy="ddp")
    ctx = RunContext(args=run_args(tmp_path, {}, hardware=hardware), task=task, spec=get_loss("ppo"), sampler=None)
    with pytest.raises(ConfigError, match=r"ppo.rollout_batch_size=4 with ppo.n_minibatches=2 gives minibatches of 2 "
                                          r"responses, fewer than the 4 processes .* at least 8"):
        ppo(ctx)


def test_dropout_is_off_in_the_policy_and_the_critic(tokenizer, task):
    """A policy built with attention dropout 0.1 and LoRA dropout 0.1: two train-mode forwards of the policy
    differ before PPO takes it, and give equal log-probs and values once it has (the critic's too)."""
    policy = apply_lora(tiny_model(tokenizer, attention_dropout=0.1), LoraArgs(r=4, dropout=0.1))
    policy.train()
    batch = pack([EncodedExample([257, 97, 98], [[99, 100, 101, 258]])] * 2, n=1, pad_id=tokenizer.pad_token_id)
    assert not torch.equal(token_logps(policy, batch), token_logps(policy, batch))
    ppo_module = module(tokenizer, task, policy, AdaptersOff(policy), value_model="critic").train()
    ppo_module.value_head.linear.weight.data.normal_()  # values that depend on the critic's states
    first, second = ppo_module.forward_policy(batch), ppo_module.forward_policy(batch)
    assert policy.training and ppo_module.critic.training
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_critic_and_lora_off_reference(tokenizer, task, tmp_path):
    """A separate critic trains; with a LoRA policy the reference is the base model (its adapters off)."""
    history, _ = run(tokenizer, task, tmp_path / "critic", steps=1, value_model="critic")
    assert math.isfinite(history[0]["loss_value"])

    base = tiny_model(tokenizer)
    policy = apply_lora(tiny_model(tokenizer), LoraArgs(r=4, dropout=0.0))
    # 16 new tokens: the random bytes of an untrained model score 0 more often than not (few of them carry
    # sentiment), and 4 rollouts of 6 tokens that all score 0 give the adapters nothing to learn from.
    history, _ = run(tokenizer, task, tmp_path / "lora", policy=policy, reference=AdaptersOff(policy), steps=2,
                     max_new_tokens=16)
    assert history[1]["kl"] != 0.0  # the adapters moved the policy away from its reference
    batch = pack([EncodedExample([257, 97], [[98, 99, 258]])], pad_id=tokenizer.pad_token_id)
    with torch.no_grad(), policy.disable_adapter():
        torch.testing.assert_close(token_logps(policy, batch), token_logps(base, batch))


@pytest.mark.parametrize("offload", [False, True])
def test_reward_model_scores_the_rollouts(tokenizer, task, tmp_path, offload):
    """A reward model folder (as the reward-model stage saves it) is the reward, kept on the device or
    offloaded; its scores are Hugging Face's own sequence-classification forward on [prompt | response]."""
    config = yaml.safe_load(TINY.read_text())
    reward_model = build_reward_model(ModelArgs(**{**config, "init_seed": 1}), tokenizer).eval()
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge_config = {"_target_": "alignexp.judges.reward_model.RewardModelJudge", "name": "reward_model",
                    "path": str(tmp_path / "rm"), "offload": offload}
    judge = build_judge(judge_config, task, key="ppo.judge", device="cpu")
    prompts, responses = ["abc:", "d:"], ["ef", ""]
    with torch.no_grad():  # one at a time, unpadded: BOS + prompt, response + EOS
        expected = [float(reward_model(input_ids=torch.tensor([[257, *p.encode(), *r.encode(), 258]])).logits[0, 0])
                    for p, r in zip(prompts, responses)]
    torch.testing.assert_close(torch.tensor(judge.score(prompts, responses)), torch.tensor(expected), rtol=1e-4,
                               atol=1e-5)
    history, _ = run(tokenizer, task, tmp_path / "ppo", steps=1, judge=judge_config)
    assert math.isfinite(history[0]["score"]) and history[0]["score"] != 0.0
    with pytest.raises(ConfigError, match="ppo.judge"):
        run(tokenizer, task, tmp_path / "missing", judge={**judge_config, "path": str(tmp_path / "missing")})


def test_rollout_and_update_quantities_are_fp32_under_bf16_autocast(tokenizer, task):
    """Under ``bf16-mixed`` (Lightning autocasts the training step, rollout included) the compute is bf16 but
    the per-token log-probs, values, advantages and returns of a rollout, and the values an update's
    forward gives the value loss, are fp32 (the value head's output would be bf16)."""
    policy, reference = tiny_model(tokenizer), tiny_model(tokenizer).requires_grad_(False).eval()
    ppo_module = module(tokenizer, task, policy, reference)
    ppo_module.value_head.linear.weight.data.normal_()
    batch = pack([EncodedExample([257, 97, 98], [[99, 100, 258]])], n=1, pad_id=tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ppo_module.value_head(response_states(policy, batch)).dtype == torch.bfloat16
        logps, values = ppo_module.forward_policy(batch)
        rollout, metrics = ppo_module.rollout(0, [0, 1, 2, 3])
    assert logps.dtype == values.dtype == torch.float32
    for name in ("logprobs", "values", "advantages", "returns"):
        assert getattr(rollout, name).dtype == torch.float32, name
    assert all(math.isfinite(v) or k == "explained_variance" for k, v in metrics.items())
