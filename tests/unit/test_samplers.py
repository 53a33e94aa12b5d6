"""Samplers: RSO's statistical rejection sampling (acceptance frequencies against exp((r - r_max)/beta)),
what RSO, RAFT and self-bootstrapping keep, their configs, and how loss=rso / loss=raft select them."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignexp.args import instantiate_target
from alignexp.config import CONF_DIR
from alignexp.judges.gold import GoldJudge
from alignexp.losses import get_loss
from alignexp.sampling import samplers
from alignexp.sampling.rejection import rejection_sample
from alignexp.sampling.samplers import SamplerContext
from alignexp.tasks.base import RankedExample, validate_example
from alignexp.tasks.synthetic import SyntheticTask


# -- RSO Algorithm 1 ----------------------------------------------------------------------------------------
def test_first_sweep_acceptance_matches_exp_r_minus_rmax_over_beta():
    """Over 4000 independent runs on a fixed reward vector, each candidate's first-sweep acceptance
    frequency is within 4 binomial standard errors of exp((r_i - r_max) / beta) (the best: exactly 1)."""
    rewards = [0.30, 0.25, 0.10, 0.0, -0.20, 0.28]
    beta, trials = 0.1, 4000
    rng = random.Random(1234)
    counts = [0] * len(rewards)
    for _ in range(trials):
        result = rejection_sample(rewards, num_samples=len(rewards), beta=beta, rng=rng)
        for index, sweep in zip(result.accepted, result.sweeps):
            counts[index] += sweep == 1
    for r, count in zip(rewards, counts):
        expected = math.exp((r - max(rewards)) / beta)
        stderr = math.sqrt(expected * (1 - expected) / trials)
        assert abs(count / trials - expected) <= 4 * stderr + 1e-12, (r, count / trials, expected)
    assert counts[0] == trials  # the best candidate is always accepted in the first sweep


def test_r_max_is_recomputed_each_sweep():
    """rewards (0, -10, -10), beta 0.1: the first sweep accepts only the best (exp(-100) ~ 0); the second
    sweep's r_max is -10, so both others are then accepted with probability 1."""
    result = rejection_sample([0.0, -10.0, -10.0], num_samples=3, beta=0.1, rng=random.Random(0))
    assert result.accepted == [0, 1, 2] and result.sweeps == [1, 2, 2]


def test_rejection_sampling_stops_at_num_samples_and_checks_its_settings():
    for seed in range(20):
        result = rejection_sample([0.1 * k for k in range(10)], num_samples=4, beta=1e6, rng=random.Random(seed))
        assert len(result.accepted) == 4 == len(set(result.accepted))
        assert result.accepted == [0, 1, 2, 3]  # beta -> infinity accepts everything, in order: a sweep stops at 4
    with pytest.raises(ValueError, match="sampler.num_samples"):
        rejection_sample([0.0, 1.0], num_samples=3, beta=1.0, rng=random.Random(0))
    with pytest.raises(ValueError, match="sampler.beta"):
        rejection_sample([0.0, 1.0], num_samples=1, beta=0.0, rng=random.Random(0))


CLASSES = {"offline": samplers.OfflineSampler, "rso": samplers.RSOSampler, "raft": samplers.RaftSampler,
           "self_bootstrap": samplers.SelfBootstrapSampler, "best_of_n": samplers.BestOfNSampler,
           "relabel": samplers.RelabelSampler}


def build_sampler(name: str, **settings):
    return CLASSES[name](name=name, **settings)


# -- the samplers, with canned candidates --------------------------------------------------------------------
TASK = SyntheticTask(n_sft=8, n_train_prompts=6, n_eval_prompts=4)


def candidate(k: int, length: int = 8) -> str:
    """A response whose gold reward is k / length (k positive letters 'a', the rest neutral 'e')."""
    return "a" * k + "e" * (length - k)


def context(tmp_path: Path) -> SamplerContext:
    return SamplerContext(task=TASK, tokenizer=None, policy=None, reference=None, reference_key="", seed=0,
                          cache_dir=tmp_path, max_prompt_len=64, max_response_len=16)


def canned(per_prompt: list[int]):
    """A ``sample`` replacement: prompt i gets candidates with k = per_prompt rotated by i."""
    def sample(model, ctx, prompts, n, stream):
        return [[candidate((k + i + stream) % 9) for k in per_prompt[:n]] for i in range(len(prompts))]
    return sample


def test_rso_keeps_higher_reward_samples_ranked_best_first(tmp_path):
    sampler = build_sampler("rso", num_candidates=8, num_samples=4, beta=0.1)
    sampler.sample = canned(list(range(8)))
    examples = sampler.examples(context(tmp_path), 0)
    assert len(examples) == 6
    for ex in examples:
        validate_example(ex, "rso", None, min_responses=2)  # ranked best first, scores consistent
        assert ex.n == 4 and ex.scores == [TASK.gold_reward(ex.prompt, y) for y in ex.responses]
        assert ex.meta["judge"] == "gold" and ex.meta["sweeps"][0] == 1
    figures = sampler.history[0]
    assert figures["accepted_reward"] > figures["candidates_reward"]


def test_raft_keeps_the_best_per_prompt_or_the_top_fraction(tmp_path):
    per_prompt = build_sampler("raft", iterations=2, num_candidates=4)
    per_prompt.sample = canned([0, 2, 4, 6])
    kept = per_prompt.examples(context(tmp_path), 0)
    assert len(kept) == 6 and all(ex.n == 1 for ex in kept)
    for i, ex in enumerate(kept):  # the best of prompt i's candidates k + i (mod 9), k in (0, 2, 4, 6)
        assert ex.scores[0] == max(((k + i) % 9) / 8 for k in (0, 2, 4, 6))
    assert per_prompt.rounds == 2

    global_ = build_sampler("raft", iterations=1, num_candidates=4, selection="global", top_fraction=0.25)
    global_.sample = canned([0, 2, 4, 6])
    kept = global_.examples(context(tmp_path), 0)
    pool = sorted((((k + i) % 9) / 8 for i in range(6) for k in (0, 2, 4, 6)), reverse=True)
    assert [ex.scores[0] for ex in kept] == pool[:6]  # 25% of 24 samples


def test_self_bootstrap_adds_the_policys_samples_and_reranks(tmp_path, monkeypatch):
    base = [RankedExample(p, [candidate(2), candidate(1)], [0.9, 0.1]) for p in TASK.prompts("train")]
    monkeypatch.setattr(samplers.OfflineSampler, "examples", lambda self, ctx, round_index: base)
    sampler = build_sampler("self_bootstrap", rounds=2, num_new=2)
    sampler.sample = canned([8, 0])
    for round_index in range(2):
        examples = sampler.examples(context(tmp_path), round_index)
        for ex in examples:
            validate_example(ex, "self_bootstrap", None, min_responses=2)
            assert ex.n == 4 and ex.scores == [TASK.gold_reward(ex.prompt, y) for y in ex.responses]
    assert [h["round"] for h in sampler.history] == [0, 1]


def test_best_of_n_trains_nothing():
    sampler = build_sampler("best_of_n", n=4)
    assert sampler.n == 4
    with pytest.raises(RuntimeError, match="nothing to train"):
        sampler.examples(None, 0)


# -- configs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((Path(CONF_DIR) / "sampler").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sampler_config_builds(compose, path):
    config = OmegaConf.to_container(compose(f"sampler={path.stem}").sampler, resolve=True)
    sampler = instantiate_target(config, "sampler")
    assert config["name"] == path.stem and isinstance(sampler, CLASSES[path.stem]) and sampler.rounds >= 1


def test_bad_sampler_settings_name_the_key():
    with pytest.raises(ValueError, match="sampler.num_candidates"):
        build_sampler("rso", num_candidates=4, num_samples=8)
    with pytest.raises(ValueError, match="sampler.selection"):
        build_sampler("raft", selection="best")
    with pytest.raises(ValueError, match="sampler.temprature"):
        build_sampler("raft", temprature=1.0)
    with pytest.raises(ValueError, match="sampler.temperature must be >= 0"):
        build_sampler("rso", temperature=-1.0)
    with pytest.raises(ValueError, match="sampler.judge"):
        build_sampler("raft", judge={"path": "x"})


def test_raft_loss_is_sft_on_the_kept_samples():
    raft, sft = get_loss("raft"), get_loss("sft")
    assert raft.fn is sft.fn and not raft.needs_reference and raft.min_responses == 1
    logps, lengths = torch.tensor([[-6.0], [-2.0]]), torch.tensor([[3], [1]])
    assert raft(logps, lengths=lengths).loss.item() == pytest.approx(2.0)  # 8 nats over 4 tokens


def test_recipes_select_their_sampler_and_loss(compose):
    rso = compose("experiment=rso")
    assert (rso.sampler.name, rso.loss.name, rso.run_name) == ("rso", "dpo", "rso")
    # The paper's budget and pairs (Sec. 5.2): 8 accepted of 64 candidates, first-round pairs.
    assert (rso.sampler.num_candidates, rso.sampler.num_samples, rso.pairs) == (64, 8, "first_round")
    assert compose("experiment=rso", "loss=hinge").loss.name == "hinge"  # the command line wins
    assert compose("experiment=rso", "sampler.num_candidates=32").sampler.num_candidates == 32
    raft = compose("experiment=raft")
    assert (raft.sampler.name, raft.loss.name, raft.run_name) == ("raft", "raft", "raft")
    assert compose("loss=raft").sampler.name == "offline"  # loss= names the loss function alone
    boot = compose("experiment=self_bootstrap")
    assert (boot.sampler.name, boot.loss.name) == ("self_bootstrap", "pro")
    reward = compose("experiment=reward_model")
    assert reward.loss.name == "reward" and reward.reward_model.heldout_fraction == 0.1


# -- seeds ------------------------------------------------------------------------------------------------------
def test_the_seed_changes_the_preference_data_and_keys_its_cache(tmp_path):
    from alignexp.args import ModelArgs
    from alignexp.models.backbone import build_model, build_tokenizer

    task = SyntheticTask(n_sft=8, n_train_prompts=6, n_eval_prompts=4)
    tokenizer = build_tokenizer(ModelArgs())
    model = build_model(ModelArgs(arch={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "num_key_value_heads": 2}), tokenizer)

    def ctx(seed: int) -> SamplerContext:
        return SamplerContext(task=task, tokenizer=tokenizer, policy=model, reference=model, reference_key="sft",
                              seed=seed, cache_dir=tmp_path, max_prompt_len=64, max_response_len=12,
                              task_config={"n_train_prompts": 6})

    first = samplers.OfflineSampler().examples(ctx(0), 0)
    files = sorted((tmp_path / "preferences").glob("*.jsonl"))
    again = samplers.OfflineSampler().examples(ctx(0), 0)  # read back from the cache
    other = samplers.OfflineSampler().examples(ctx(1), 0)
    assert len(files) == 1 and [ex.responses for ex in first] == [ex.responses for ex in again]
    assert [ex.responses for ex in first] != [ex.responses for ex in other]
    assert len(list((tmp_path / "preferences").glob("*.jsonl"))) == 2  # one file per seed


def test_a_seed_sweep_shares_one_sft_policy_and_sft_seed_keys_it(compose):
    from alignexp.config import build_task, validate
    from alignexp.pipeline.weights import sft_policy_folder

    def folder(*overrides):
        args = validate(compose(*overrides))
        return sft_policy_folder(args, build_task(args.task))

    assert folder("seed=0") == folder("seed=1") == folder("seed=2")
    assert folder("sft.seed=1") != folder("sft.seed=0")
    assert folder("sft.lr=1e-3") != folder() and folder("task.tau=0.5") == folder()  # only what it depends on


def test_rso_warns_about_pairs_its_paper_does_not_use():
    from alignexp.pipeline.preference import pairs_warning

    rso = build_sampler("rso")
    assert "pairs=first_round or pairs=tournament" in pairs_warning(rso, get_loss("dpo"), "best_worst")
    assert pairs_warning(rso, get_loss("dpo"), "tournament") is None
    assert pairs_warning(rso, get_loss("ranked_dpo"), "best_worst") is None  # listwise: no pairs
    assert pairs_warning(build_sampler("offline"), get_loss("dpo"), "best_worst") is None


def test_sampled_tokens_reach_training_without_a_text_round_trip(tmp_path):
    """Generations cut at the token limit carry no EOS into training, and every sampled response is encoded
    from the tokens that were sampled, also after the preference cache is read back."""
    import pickle

    from alignexp.args import ModelArgs
    from alignexp.lightning_modules.datamodule import encode_all
    from alignexp.models.backbone import build_model, build_tokenizer
    from alignexp.tasks.base import SampledText

    task = SyntheticTask(n_sft=8, n_train_prompts=6, n_eval_prompts=4)
    tokenizer = build_tokenizer(ModelArgs())
    model = build_model(ModelArgs(arch={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "num_key_value_heads": 2}), tokenizer)
    ctx = SamplerContext(task=task, tokenizer=tokenizer, policy=model, reference=model, reference_key="sft", seed=0,
                         cache_dir=tmp_path, max_prompt_len=64, max_response_len=6, task_config={})
    for _ in range(2):  # sampled, then read from the cache
        examples = samplers.OfflineSampler().examples(ctx, 0)
        responses = [r for ex in examples for r in ex.responses]
        assert all(isinstance(r, SampledText) for r in responses)
        cut = [r for r in responses if not r.finished]
        assert cut, "with 6 new tokens some generations are cut"  # an untrained model rarely stops early
        encoded = encode_all(tokenizer, examples, 64, 6)
        for ex, enc in zip(examples, encoded):
            for response, ids in zip(ex.responses, enc.response_ids):
                assert ids == list(response.token_ids)
                assert (ids[-1] == tokenizer.eos_token_id) == response.finished
    copied = pickle.loads(pickle.dumps(cut[0]))
    assert copied == cut[0] and copied.token_ids == cut[0].token_ids and copied.finished is False


def test_relabel_reranks_the_same_responses_with_the_samplers_judge(tmp_path, monkeypatch):
    """A judge that prefers the opposite of the task reverses every ranking (agreement 0); the gold judge
    keeps them (agreement 1); a noisy gold judge lands between, on the same responses."""
    from alignexp.judges.gold import NoisyGoldJudge

    base = [RankedExample(p, [candidate(6), candidate(3), candidate(0)], [0.75, 0.375, 0.0])
            for p in TASK.prompts("train")]
    monkeypatch.setattr(samplers.OfflineSampler, "examples", lambda self, ctx, round_index: base)

    def agreement(judge) -> tuple[float, list[RankedExample]]:
        sampler = build_sampler("relabel")
        sampler.judge = judge
        out = sampler.examples(context(tmp_path), 0)
        assert [sorted(ex.responses) for ex in out] == [sorted(ex.responses) for ex in base]  # the same responses
        return sampler.history[0]["label_agreement"], out

    class Contrary(GoldJudge):
        def score(self, prompts, responses):
            return [-s for s in super().score(prompts, responses)]

    assert agreement(GoldJudge(TASK))[0] == 1.0
    contrary, out = agreement(Contrary(TASK))
    assert contrary == 0.0 and out[0].responses == base[0].responses[::-1]
    noisy, _ = agreement(NoisyGoldJudge(TASK, noise=0.5, seed=1))
    assert 0.0 < noisy < 1.0


def test_noisy_gold_scores_are_stable_and_centered_on_gold():
    from alignexp.judges.gold import NoisyGoldJudge

    judge = NoisyGoldJudge(TASK, noise=0.2, seed=0)
    prompts = [f"p{i}:" for i in range(400)]
    responses = [candidate(i % 9) for i in range(400)]
    first, second = judge.score(prompts, responses), judge.score(prompts, responses)
    assert first == second  # the same response is scored the same each time
    errors = [s - TASK.gold_reward(p, r) for s, p, r in zip(first, prompts, responses)]
    mean = sum(errors) / len(errors)
    sd = (sum((e - mean) ** 2 for e in errors) / (len(errors) - 1)) ** 0.5
    assert abs(mean) < 3 * 0.2 / len(errors) ** 0.5 and 0.17 < sd < 0.23
    assert NoisyGoldJudge(TASK, noise=0.0).score(prompts[:5], responses[:5]) == GoldJudge(TASK).score(prompts[:5],
                                                                                                        responses[:5])


def test_self_bootstrap_can_add_an_external_policys_samples(tmp_path, monkeypatch):
    """``source=<folder>``: the new responses come from that policy, loaded once, not from the one trained."""
    from alignexp.args import ModelArgs
    from alignexp.models.backbone import build_model, build_tokenizer

    tokenizer = build_tokenizer(ModelArgs())
    arch = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2}
    external = build_model(ModelArgs(arch=arch, init_seed=7), tokenizer)
    external.save_pretrained(tmp_path / "external")
    tokenizer.save_pretrained(tmp_path / "external")
    trained = build_model(ModelArgs(arch=arch, init_seed=1), tokenizer)
    base = [RankedExample(p, [candidate(2), candidate(1)], [0.9, 0.1]) for p in TASK.prompts("train")]
    monkeypatch.setattr(samplers.OfflineSampler, "examples", lambda self, ctx, round_index: base)
    used = []

    def sample(model, ctx, prompts, n, stream):
        used.append(model)
        return [[candidate(4)] * n for _ in prompts]

    ctx = SamplerContext(task=TASK, tokenizer=tokenizer, policy=trained, reference=trained, reference_key="", seed=0,
                         cache_dir=tmp_path, max_prompt_len=64, max_response_len=16)
    for source, expected in ((None, trained), (str(tmp_path / "external"), external)):
        sampler = build_sampler("self_bootstrap", rounds=2, num_new=1, source=source)
        sampler.sample = sample
        used.clear()
        for round_index in range(2):
            sampler.examples(ctx, round_index)
        assert len(used) == 2 and used[0] is used[1]  # the external policy is loaded once
        weights = {k: v for k, v in used[0].state_dict().items()}
        assert all(torch.equal(weights[k], v) for k, v in expected.state_dict().items())


def test_rso_candidates_from_the_reference_are_cached_per_seed(tmp_path):
    calls = []

    def sample(model, ctx, prompts, n, stream):
        calls.append(ctx.seed)
        return [[candidate((k + ctx.seed) % 9) for k in range(n)] for _ in prompts]

    sampler = build_sampler("rso", num_candidates=8, num_samples=4)
    sampler.sample = sample
    first = sampler.examples(context(tmp_path), 0)
    again = sampler.examples(context(tmp_path), 0)
    other = sampler.examples(dataclasses.replace(context(tmp_path), seed=1), 0)
    assert calls == [0, 1]  # the same seed read its candidates back; another seed drew its own
    assert [ex.responses for ex in first] == [ex.responses for ex in again] != [ex.responses for ex in other]
