"""The RankedExample contract: validation errors name source, record and field; skips are counted."""

from __future__ import annotations

import math

import pytest

from alignexp.tasks.base import DataError, RankedExample, Validator, truncate_rankings, validate_example


@pytest.mark.parametrize("example, field, reason", [
    (RankedExample("", ["a", "b"]), "prompt", "empty"),
    (RankedExample("p", ["a", "  "]), "responses[1]", "empty"),
    (RankedExample("p", ["a", "b"], scores=[1.0]), "scores", "1 scores for 2 responses"),
    (RankedExample("p", ["a", "b"], scores=[1.0, math.nan]), "scores[1]", "nan"),
    (RankedExample("p", ["a", "b"], scores=[0.0, 1.0]), "scores", "not ranked best first"),
    (RankedExample("p", ["a", 3]), "responses[1]", "expected a string"),
    (RankedExample([{"role": "user"}], ["a"]), "prompt[0]", "message"),
])
def test_invalid_examples_name_the_field(example, field, reason):
    with pytest.raises(DataError) as info:
        validate_example(example, "data.jsonl", 7)
    message = str(info.value)
    assert "data.jsonl, record 7" in message and f"field '{field}'" in message and reason in message


def test_too_few_responses_for_the_loss():
    with pytest.raises(DataError, match="needs at least 2"):
        validate_example(RankedExample("p", ["a"]), "f", 0, min_responses=2)


def test_ties_are_valid():
    validate_example(RankedExample("p", ["a", "b", "c"], scores=[2.0, 2.0, 1.0]), "f", 0)


def test_validator_raises_or_counts_skips_by_reason():
    records = [("p", "a"), ("", "b"), ("q", ""), ("r", "c"), ("", "d")]

    def parse(record, index):
        return RankedExample(record[0], [record[1]])

    with pytest.raises(DataError, match="record 1"):
        list(Validator("mem", skip_invalid=False).run(records, parse))
    validator = Validator("mem", skip_invalid=True)
    kept = list(validator.run(records, parse))
    assert [e.prompt for e in kept] == ["p", "r"]
    report = validator.report
    assert report.records == 5 and report.examples == 2 and sum(report.skipped.values()) == 3
    assert report.skipped["prompt: empty text"] == 2 and report.skipped["responses: empty text"] == 1
    assert "3 skipped" in report.summary()


def test_truncate_rankings_keeps_best_worst_and_evenly_spaced():
    """n = 7, k = 4: positions round(i * 6 / 3) = 0, 2, 4, 6. k = 2: best and worst. k >= n: all."""
    ex = RankedExample("p", list("abcdefg"), scores=[7, 6, 5, 4, 3, 2, 1])
    assert truncate_rankings([ex], 4)[0].responses == ["a", "c", "e", "g"]
    assert truncate_rankings([ex], 4)[0].scores == [7, 5, 3, 1]
    assert truncate_rankings([ex], 2)[0].responses == ["a", "g"]
    assert truncate_rankings([ex], 9)[0].responses == list("abcdefg")
    assert truncate_rankings([ex], None)[0] is ex
