"""The synthetic task: determinism, the gold reward by hand, and the Plackett-Luce labels."""

from __future__ import annotations

import math
import random

import pytest

from alignexp.tasks.synthetic import SyntheticTask


def test_same_seed_same_data_and_different_seed_different_data():
    a, b, c = SyntheticTask(seed=0), SyntheticTask(seed=0), SyntheticTask(seed=1)
    assert [e.__dict__ for e in a.sft_examples()[:50]] == [e.__dict__ for e in b.sft_examples()[:50]]
    assert a.prompts("eval") == b.prompts("eval")
    assert a.prompts("eval") != c.prompts("eval")
    assert not set(a.prompts("eval")) & set(a.prompts("train")) or len(a.prompts("eval")) == 128


def test_gold_reward_by_hand():
    """Alphabet of 16: a-d positive (+1), m-p negative (-1), e-l neutral (0).

    "aam" -> (1 + 1 - 1) / 3 = 1/3; "ppp" -> -1; "aaaa" -> 1; "eZ!" -> 0 (outside the alphabet counts 0).
    """
    task = SyntheticTask(alphabet_size=16)
    assert task.gold_reward("x:", "aam") == pytest.approx(1 / 3)
    assert task.gold_reward("x:", "ppp") == -1.0
    assert task.gold_reward("x:", "aaaa") == 1.0
    assert task.gold_reward("x:", "eZ!") == 0.0
    assert task.gold_reward("x:", "") == 0.0


def test_demonstrations_continue_the_chain_with_room_to_improve():
    task = SyntheticTask()
    examples = task.sft_examples()
    rewards = [task.gold_reward(e.prompt, e.responses[0]) for e in examples]
    mean = sum(rewards) / len(rewards)
    assert -0.5 < mean < 0.5  # far from the maximum of 1: the SFT policy leaves room
    assert all(task.min_len <= len(e.responses[0]) <= task.max_len for e in examples)
    assert all(set(e.responses[0]) <= set(task.alphabet) for e in examples)


def test_exact_ranking_at_tau_zero_keeps_ties_in_order():
    task = SyntheticTask(tau=0.0)
    ex = task.rank("abc:", ["ppp", "aaa", "eee", "fff"], random.Random(0))
    assert ex.responses == ["aaa", "eee", "fff", "ppp"]  # eee and fff tie at 0 and keep their order
    assert ex.scores == [1.0, 0.0, 0.0, -1.0]


def test_plackett_luce_frequencies_match_the_model():
    """For two responses, P(y1 ranked first) = sigmoid((r1 - r2) / tau) under Gumbel-max.

    r("aab") = 1 and r("aee") = 1/3 (alphabet 16), tau = 0.5: P = sigmoid(4/3) = 0.7914.
    """
    task = SyntheticTask(tau=0.5)
    rng = random.Random(7)
    trials = 4000
    first = sum(task.rank("x:", ["aee", "aab"], rng).responses[0] == "aab" for _ in range(trials))
    expected = 1 / (1 + math.exp(-(1 - 1 / 3) / 0.5))
    stderr = math.sqrt(expected * (1 - expected) / trials)
    assert abs(first / trials - expected) < 4 * stderr


def test_preference_examples_sample_n_and_rank_best_first():
    task = SyntheticTask(n_train_prompts=5, n_responses=3)

    def sample_fn(prompts, n):
        return [["ppp", "aaa", "eee"][:n] for _ in prompts]

    examples = task.preference_examples("train", sample_fn=sample_fn)
    assert len(examples) == 5 and all(e.n == 3 for e in examples)
    assert all(e.scores == sorted(e.scores, reverse=True) for e in examples)
    assert all(len(e.meta["gold_rewards"]) == 3 for e in examples)
    with pytest.raises(ValueError, match="sample_fn"):
        task.preference_examples("train")


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="task.tau"):
        SyntheticTask(tau=-1)
    with pytest.raises(ValueError, match="task.alphabet_size"):
        SyntheticTask(alphabet_size=40)


def test_validation_prompts_are_held_out_from_training_and_evaluation():
    task = SyntheticTask(n_train_prompts=64, n_eval_prompts=32, n_val_prompts=32)
    train, evaluation, validation = (set(task.prompts(s)) for s in ("train", "eval", "validation"))
    assert len(validation) == 32 and not validation & evaluation and not validation & train
    assert [ex.prompt for ex in task.eval_examples()] == task.prompts("eval")
    tuning = SyntheticTask(n_train_prompts=64, n_eval_prompts=32, n_val_prompts=32, eval_split="validation")
    assert [ex.prompt for ex in tuning.eval_examples()] == task.prompts("validation")
    with pytest.raises(ValueError, match="task.eval_split"):
        SyntheticTask(eval_split="test")
