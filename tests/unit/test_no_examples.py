"""Zero examples is an error naming each filter and its count: a task's filters (mt's language pairs and
directions), the shaping for a loss (too-short rankings, tied pairs), and the data CLI's warnings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignexp.data import filter_warnings
from alignexp.losses import get_loss
from alignexp.pipeline.preference import shape_for_loss
from alignexp.tasks.base import LoadReport, RankedExample
from alignexp.tasks.loading import NoExamples
from alignexp.tasks.mt import TranslationTask

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DE_EN = str(FIXTURES / "mt" / "alma_de_en.jsonl")  # 2 de-en records; the second requires en-de only


def test_mt_names_the_setting_that_leaves_every_record_out():
    with pytest.raises(NoExamples, match=r"mt preferences \(task.path=.*alma_de_en.jsonl\): 2 records read; 2 left "
                                         r"out: language_pair de-en not in task.language_pairs=\[cs-en\] \(2\)\. "
                                         r"No examples are left"):
        TranslationTask(path=DE_EN).preference_examples()
    task = TranslationTask(path=DE_EN, language_pairs=["de-en"], directions=["de-en"])
    assert len(task.preference_examples()) == 1  # record 0's de-en; record 1 requires en-de
    assert task.last_report.filtered == {"required_directions en-de not in task.directions=[de-en]": 1}
    assert len(TranslationTask(path=DE_EN, language_pairs=["de-en"]).preference_examples()) == 3


def test_an_empty_file_is_no_data():
    with pytest.raises(NoExamples, match=r"mt preferences \(task.path=.*empty.jsonl\): no records in .*empty.jsonl"):
        TranslationTask(path=str(FIXTURES / "empty" / "empty.jsonl")).preference_examples()


def shaping_context(loss: str, pairs: str = "best_worst", ranking_length: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(spec=get_loss(loss), task=SimpleNamespace(ranking_length=ranking_length),
                           args=SimpleNamespace(pairs=pairs, seed=0))


def test_shaping_that_leaves_nothing_names_its_filters():
    """3 rankings: one of a single response (too short for a pair), two whose responses all tie (no pair
    under any strategy): nothing for DPO, the counts named; ranked DPO reads the tied lists as they are."""
    rankings = [RankedExample("p", ["a"], [1.0]), RankedExample("q", ["a", "b"], [2.0, 2.0]),
                RankedExample("r", ["a", "b", "c"], [0.5, 0.5, 0.5])]
    with pytest.raises(NoExamples, match=r"training data for loss 'dpo': 3 rankings, none left: 1 have fewer than "
                                         r"the 2 responses it needs \(task.ranking_length=None\); 2 give no pair "
                                         r"under pairs=all \(their responses tie\)"):
        shape_for_loss(shaping_context("dpo", "all"), rankings, 0)
    assert len(shape_for_loss(shaping_context("ranked_dpo"), rankings, 0)) == 2
    untied = [RankedExample("q", ["a", "b"], [2.0, 1.0])]
    assert len(shape_for_loss(shaping_context("dpo"), untied, 0)) == 1


def test_data_warns_when_a_filter_drops_more_than_half():
    report = LoadReport("mt preferences: f.jsonl", records=4, examples=1,
                        filtered=Counter({"language_pair de-en not in task.language_pairs=[cs-en]": 3}))
    assert filter_warnings(report) == ["language_pair de-en not in task.language_pairs=[cs-en]: 3 of 4 records "
                                       "left out"]
    half = LoadReport("x", records=4, examples=2, skipped=Counter({"prompt: empty text": 1}),
                      filtered=Counter({"CNN/DM article, not a TL;DR post": 1}))
    assert filter_warnings(half) == []  # exactly half is not more than half
    half.skipped["prompt: missing field"] += 1
    assert filter_warnings(half) == ["3 of 4 records left out in all (1 left out: CNN/DM article, not a TL;DR post "
                                     "(1); 2 skipped as invalid (task.skip_invalid=true): prompt: empty text (1); "
                                     "prompt: missing field (1))"]
