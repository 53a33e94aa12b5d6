"""Binary feedback as data: TRL's unpaired format read by task=custom, rankings turned into binary feedback,
the synthetic task's single samples labelled by a gold-reward threshold, the mismatched responses of KTO's
reference point, and a loss given data it does not read refused before the work."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignexp.errors import ConfigError
from alignexp.losses import get_loss
from alignexp.pipeline.preference import check_training_data, shape_for_loss
from alignexp.tasks.base import (
    DataError,
    RankedExample,
    binary_feedback,
    validate_example,
    with_mismatched_responses,
)
from alignexp.tasks.custom import CustomTask
from alignexp.tasks.synthetic import SyntheticTask

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "custom"
BINARY = str(FIXTURES / "binary.jsonl")


def test_custom_reads_trl_unpaired_preference_records():
    """6 records {prompt, completion, label}, standard and conversational, detected as binary feedback."""
    examples = CustomTask(path=BINARY).preference_examples()
    assert [ex.label for ex in examples] == [True, False, True, False, True, False]
    assert all(ex.n == 1 and ex.scores is None for ex in examples)
    assert examples[0].prompt == "The sky is" and examples[1].responses == [" green."]
    assert examples[4].prompt == [{"role": "user", "content": "Say thanks in Spanish."}]
    assert examples[4].responses == ["Gracias."]  # a one-message assistant reply as its text
    assert CustomTask(path=BINARY, format="binary").preference_examples() == examples


def test_custom_binary_demonstrations_are_the_desirable_completions():
    task = CustomTask(path=BINARY)
    assert [ex.responses[0] for ex in task.sft_examples()] == [" blue.", " four.", "Gracias."]
    assert all(ex.label is None for ex in task.sft_examples())


def test_a_bad_label_names_record_and_field():
    with pytest.raises(DataError, match=r"binary_bad.jsonl, record 1 \(numbered from 0\), field 'label': expected true \(desirable\) "
                                        r"or false \(undesirable\), got 'yes'"):
        CustomTask(path=str(FIXTURES / "binary_bad.jsonl")).preference_examples()


def test_binary_examples_have_one_response():
    with pytest.raises(DataError, match="field 'label': binary feedback has one response and no scores"):
        validate_example(RankedExample("p", ["a", "b"], label=True), "src", 3)
    with pytest.raises(DataError, match="field 'label': expected true or false, got 1"):
        validate_example(RankedExample("p", ["a"], label=1), "src", 3)


def test_rankings_become_binary_feedback():
    """best: the best (and what ties it) desirable, the rest not; a number: scores at or above it desirable."""
    rankings = [RankedExample("p", ["a", "b", "c"], [3.0, 3.0, 1.0]), RankedExample("q", ["d", "e"])]
    best = binary_feedback(rankings, "best")
    assert [(ex.prompt, ex.responses[0], ex.label) for ex in best] == [
        ("p", "a", True), ("p", "b", True), ("p", "c", False), ("q", "d", True), ("q", "e", False)]
    assert [ex.meta["rank"] for ex in best] == [0, 1, 2, 0, 1]
    scored = binary_feedback(rankings[:1], 2.0)
    assert [ex.label for ex in scored] == [True, True, False]
    assert binary_feedback(best, 2.0) == best  # labelled examples pass through
    with pytest.raises(DataError, match=r"rankings, record 1 \(numbered from 0\), field 'scores': binary=2.0: labelling by a score "
                                        r"threshold needs scores"):
        binary_feedback(rankings, 2.0)


def test_mismatched_responses_come_from_other_prompts():
    """Each example gets the response of another prompt's example; its label goes into the scores."""
    examples = binary_feedback([RankedExample(p, [f"{p}1", f"{p}2", f"{p}3"]) for p in "abcd"], "best")
    packed = with_mismatched_responses(examples, random.Random(0))
    assert len(packed) == len(examples)
    for ex, original in zip(packed, examples):
        assert ex.responses[0] == original.responses[0]
        assert ex.responses[1][0] != ex.prompt  # another prompt's response
        assert ex.scores == [1.0, 1.0] if original.label else ex.scores == [0.0, 0.0]
    again = with_mismatched_responses(examples, random.Random(0))
    assert [ex.responses for ex in again] == [ex.responses for ex in packed]
    with pytest.raises(DataError, match="give at least two"):
        with_mismatched_responses(binary_feedback([RankedExample("a", ["x", "y"])]), random.Random(0))


def test_synthetic_labels_single_samples_by_the_gold_reward():
    """Alphabet a-p: its first quarter (a-d) scores +1 a letter, its last (m-p) -1, the rest 0; so 'aaa' has
    gold reward 1, 'hhh' 0 and 'ppp' -1. Against the threshold 0 each sample is judged alone, on its exact reward:
    'aaa' and 'hhh' desirable, 'ppp' not."""
    task = SyntheticTask(n_train_prompts=3, n_responses=3, binary_threshold=0.0)
    examples = task.preference_examples("train", sample_fn=lambda prompts, n: [["ppp", "aaa", "hhh"] for _ in prompts])
    assert len(examples) == 9 and task.feedback == "binary"
    for ex in examples:
        gold = task.gold_reward(ex.prompt, ex.responses[0])
        assert ex.meta["gold_rewards"] == [gold] and ex.label == (gold >= 0.0)
    assert [ex.label for ex in examples[:3]] == [False, True, True]
    assert SyntheticTask().feedback == "rankings"
    with pytest.raises(ValueError, match="task.binary_threshold"):
        SyntheticTask(binary_threshold="high")


def shaping_context(loss: str, binary="best", task=None) -> SimpleNamespace:
    return SimpleNamespace(spec=get_loss(loss), task=task or SimpleNamespace(ranking_length=None, name="t"),
                           args=SimpleNamespace(pairs="best_worst", seed=0, binary=binary))


def test_shaping_for_kto_packs_label_and_mismatched_response():
    rankings = [RankedExample("p", ["a", "b"], [2.0, 1.0]), RankedExample("q", ["c", "d"], [0.5, 0.0])]
    shaped = shape_for_loss(shaping_context("kto"), rankings, 0)
    assert [ex.n for ex in shaped] == [2, 2, 2, 2] and [ex.scores[0] for ex in shaped] == [1.0, 0.0, 1.0, 0.0]
    by_threshold = shape_for_loss(shaping_context("kto", binary=0.75), rankings, 0)
    assert [ex.scores[0] for ex in by_threshold] == [1.0, 1.0, 0.0, 0.0]


def test_a_loss_on_rankings_refuses_binary_feedback():
    binary = CustomTask(path=BINARY).preference_examples()
    with pytest.raises(ConfigError, match=r"loss=dpo trains on rankings and the task's preference data is binary "
                                          r"feedback .*loss=kto"):
        shape_for_loss(shaping_context("dpo"), binary, 0)


def test_the_mismatch_is_refused_before_any_model():
    """The synthetic task samples its data once a policy exists: what it will give (binary feedback, from
    task.binary_threshold) is checked against the loss beforehand, by the preference stage's check."""
    task = SyntheticTask(binary_threshold=0.0)
    ctx = SimpleNamespace(spec=get_loss("ranked_dpo"), task=task, sampler=SimpleNamespace(check=lambda t: None),
                          args=SimpleNamespace(binary="best"))
    with pytest.raises(ConfigError, match=r"training data \(stage preference\): loss=ranked_dpo trains on rankings "
                                          r"and the task's preference data is binary feedback"):
        check_training_data(ctx)
    ctx.spec = get_loss("kto")
    check_training_data(ctx)


def test_examples_with_labels_survive_the_sample_cache(tmp_path):
    from alignexp.sampling.samplers import read_jsonl_examples, write_jsonl_examples

    examples = [RankedExample("p", ["a"], label=False, meta={"index": 0})]
    write_jsonl_examples(tmp_path / "x.jsonl", examples)
    assert json.loads((tmp_path / "x.jsonl").read_text())["label"] is False
    assert read_jsonl_examples(tmp_path / "x.jsonl") == examples
