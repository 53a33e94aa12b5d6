"""The real tasks on hand-written fixtures (tests/fixtures/<task>/): exact counts, orders, and bad records.

Every bad record of a ``*_bad.jsonl`` fixture is checked twice: alone, for the field its error names,
and in its file, where strict loading stops at the first one (naming file, record and field) and
``skip_invalid`` counts each by reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignexp.tasks.base import DataError
from alignexp.tasks.custom import CustomTask, common_string_prefix
from alignexp.tasks.hh import HhTask, split_transcripts, transcript_to_messages
from alignexp.tasks.loading import DataUnavailable, local_sources, read_file
from alignexp.tasks.mt import TranslationTask
from alignexp.tasks.tldr import TldrTask, group_comparisons, parse_comparison, parse_post
from alignexp.tasks.ultrachat import UltraChatTask
from alignexp.tasks.ultrafeedback import UltraFeedbackTask

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fx(name: str) -> str:
    return str(FIXTURES / name)


def records(name: str) -> list:
    return list(read_file(FIXTURES / name))


def assert_rejects(task_call, file: str, index: int, field: str) -> DataError:
    """Strict loading stops at record ``index`` of ``file``, and the message names all three."""
    with pytest.raises(DataError) as caught:
        task_call()
    error = caught.value
    assert (error.index, error.field_name) == (index, field)
    message = str(error)
    assert file in message and f"record {index}" in message and f"'{field}'" in message
    return error


# -- the shared loader ------------------------------------------------------------------------------

def test_formats_jsonl_json_parquet_and_save_to_disk_read_the_same(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = records("ultrafeedback/binarized.jsonl")
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"train_prefs": rows, "test_prefs": rows[:1]}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                          "test_prefs": datasets.Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "saved")

    def pairs(path):
        return [(ex.prompt, ex.responses, ex.scores) for ex in UltraFeedbackTask(path=path).preference_examples()]

    expected = pairs(fx("ultrafeedback/binarized.jsonl"))
    assert len(expected) == 3
    for name in ("pairs.json", "wrapped.json", "pairs.parquet", "saved"):
        assert pairs(str(tmp_path / name)) == expected, name
    task = UltraFeedbackTask(path=str(tmp_path / "saved"))
    assert len(task.eval_examples()) == 1  # test_prefs of the DatasetDict
    assert task.last_report.source.endswith("saved[test_prefs]")
    with pytest.raises(DataUnavailable, match="no split 'nope'.*train_prefs"):
        task.preference_examples("nope")


def test_folder_reads_the_split_files_and_prefers_the_config_folder(tmp_path):
    task = CustomTask(path=fx("custom/folder"))
    assert len(task.preference_examples()) == 2 and len(task.eval_examples()) == 1
    # A hub snapshot: <config>/<split>-00000-of-00001.parquet, one folder per language pair.
    import pyarrow as pa
    import pyarrow.parquet as pq

    for pair, file in (("cs-en", "mt/alma_cs_en.jsonl"), ("de-en", "mt/alma_cs_en.jsonl")):
        (tmp_path / pair).mkdir()
        rows = records(file)[:1] if pair == "de-en" else records(file)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / pair / "train-00000-of-00001-abc.parquet")
    (tmp_path / "cs-en" / "notes.txt").write_text("ignored")
    assert len(TranslationTask(path=str(tmp_path)).preference_examples()) == 5
    with pytest.raises(DataUnavailable, match="no data files for split 'test'"):
        local_sources(tmp_path, "test")


def test_missing_local_path_and_bad_json_lines(tmp_path):
    with pytest.raises(DataUnavailable, match="no such file or folder"):
        CustomTask(path=str(tmp_path / "absent.jsonl")).preference_examples()
    with pytest.raises(DataUnavailable, match="set task.path"):
        CustomTask().preference_examples()
    assert_rejects(lambda: TldrTask(path=fx("tldr/comparisons_bad.jsonl"), skip_invalid=False)
                   .preference_examples(), "comparisons_bad.jsonl", 1, "choice")
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": \n')
    assert_rejects(lambda: CustomTask(path=str(bad)).preference_examples(), "broken.jsonl", 1, "<record>")


def test_hub_without_network_says_how_to_use_a_local_copy(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailable) as caught:
        HhTask(hub_id="alignexp-tests/not-cached").preference_examples()
    message = str(caught.value)
    assert "alignexp-tests/not-cached" in message and "task.path" in message and "save_to_disk" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback
    with pytest.raises(DataUnavailable, match="task.sft_path"):
        TldrTask(sft_hub_id="alignexp-tests/not-cached").sft_examples()


# -- tldr -------------------------------------------------------------------------------------------

def test_tldr_comparisons_grouped_into_rankings_where_consistent():
    task = TldrTask(path=fx("tldr/comparisons.jsonl"))
    examples = task.preference_examples()
    report = task.last_report
    assert (report.records, report.examples, sum(report.skipped.values())) == (10, 7, 0)
    assert report.filtered == {"CNN/DM article, not a TL;DR post": 1}
    assert [ex.n for ex in examples] == [3, 2, 2, 2, 2, 2, 2]
    # Post A: three comparisons agreeing on long > "I got a cat." > "cat." -> one ranking.
    assert examples[0].responses == [" new cat hides under the bed all day and only eats at night.",
                                     " I got a cat.", " cat."]
    assert examples[0].meta["indices"] == [0, 1, 2]
    assert examples[0].meta["policies"] == ["sup4_ppo_rm3", "sup2", "pretrain_xl"]
    assert examples[0].prompt == ("SUBREDDIT: r/cats\n\nTITLE: New cat hides all day\n\nPOST: I adopted a cat "
                                  "last week and she hides under the bed all day. She eats at night only.\n\nTL;DR:")
    # Post B: a cycle -> its three pairs, each preferred summary first.
    assert [ex.meta["indices"] for ex in examples[1:4]] == [[3], [4], [5]]
    assert examples[1].responses == [" manager schedules 7pm meetings, I have a toddler.", " late meetings at work."]
    # Post C: no title -> no TITLE line; the summary gets its leading space.
    assert examples[4].prompt.startswith("SUBREDDIT: r/legaladvice\n\nPOST: Every time")
    assert examples[4].responses[0] == " basement floods when it rains, landlord says normal"
    # Post D: two pairs sharing a winner do not order the losers -> kept as pairs.
    assert [ex.meta["indices"] for ex in examples[5:]] == [[7], [8]]
    assert all(ex.scores is None for ex in examples)


def test_tldr_without_grouping_and_with_ranking_length():
    assert len(TldrTask(path=fx("tldr/comparisons.jsonl"), group_comparisons=False).preference_examples()) == 9
    cut = TldrTask(path=fx("tldr/comparisons.jsonl"), ranking_length=2).preference_examples()
    assert cut[0].responses == [" new cat hides under the bed all day and only eats at night.", " cat."]


def test_group_comparisons_total_order_rules():
    pairs = [parse_comparison(r, i, "f") for i, r in enumerate(records("tldr/comparisons.jsonl"))]
    pairs = [p for p in pairs if p is not None]
    assert len(pairs) == 9
    assert len(group_comparisons(pairs[:3])) == 1
    assert len(group_comparisons(pairs[3:6])) == 3  # cycle
    assert len(group_comparisons(pairs[:2])) == 1  # long > mid and mid > short: already total
    assert len(group_comparisons([pairs[0], pairs[2]])) == 2  # long beats both, the others unordered


def test_tldr_sft_both_schemas_and_eval_targets():
    trl = TldrTask(sft_path=fx("tldr/sft_trl.jsonl")).sft_examples()
    assert len(trl) == 3
    assert trl[0].responses == [" roommate eats my groceries despite two talks, how do I get him to stop?"]
    assert trl[0].prompt.startswith("SUBREDDIT: r/relationships\n\nTITLE: My roommate")
    raw = TldrTask(sft_path=fx("tldr/sft_raw.jsonl")).sft_examples()
    assert len(raw) == 3
    assert raw[0].prompt == ("SUBREDDIT: r/running\n\nTITLE: First half marathon next month\n\nPOST: I have been "
                             "training for 12 weeks and my long runs are at 10 miles. My knees ache a bit after "
                             "long runs.\n\nTL;DR:")
    assert raw[0].responses == [" half marathon in a month, knees ache after long runs, should I worry?"]
    assert raw[1].responses == [" my bread is always dense even though I follow the recipe."]
    assert raw[2].prompt.startswith("TITLE: Moving")  # null subreddit: no SUBREDDIT line
    task = TldrTask(sft_path=fx("tldr/sft_raw.jsonl"), max_eval_examples=2)
    evals = task.eval_examples()
    assert len(evals) == 2 and all(ex.target == ex.responses[0] for ex in evals)


COMPARISONS_BAD = [(1, "choice"), (2, "summaries[1].text"), (3, "info.post"), (4, "summaries"), (5, "choice"),
                   (7, "<record>")]


@pytest.mark.parametrize("index,field", COMPARISONS_BAD)
def test_tldr_bad_comparison_parse_names_its_field(index, field):
    record = records("tldr/comparisons_bad.jsonl")[index]
    if field == "<record>":
        assert type(record).__name__ == "InvalidRecord"
        return
    with pytest.raises(DataError) as caught:
        parse_comparison(record, index, "comparisons_bad.jsonl")
    assert caught.value.field_name == field


def test_tldr_bad_comparisons_skipped_and_counted():
    task = TldrTask(path=fx("tldr/comparisons_bad.jsonl"), skip_invalid=True)
    examples = task.preference_examples()
    report = task.last_report
    assert (report.records, report.examples, len(examples)) == (8, 2, 2)
    assert sum(report.skipped.values()) == 6
    assert report.skipped["choice: out of range: expected 0 or 1, got 2"] == 1
    assert report.skipped["choice: expected 0 or 1, got '1'"] == 1
    assert report.skipped["summaries: empty text"] == 1
    assert report.skipped["info.post: missing field"] == 1
    assert report.skipped["summaries: expected a list of 2 summaries, got 1 summaries"] == 1
    assert sum(v for k, v in report.skipped.items() if "invalid JSON" in k) == 1
    assert "6 skipped" in report.summary()


@pytest.mark.parametrize("index,field", [(1, "summary"), (2, "post"), (3, "completion")])
def test_tldr_bad_posts(index, field):
    with pytest.raises(DataError) as caught:
        parse_post(records("tldr/sft_bad.jsonl")[index], index, "sft_bad.jsonl")
    assert caught.value.field_name == field
    assert_rejects(TldrTask(sft_path=fx("tldr/sft_bad.jsonl")).sft_examples, "sft_bad.jsonl", 1, "summary")
    task = TldrTask(sft_path=fx("tldr/sft_bad.jsonl"), skip_invalid=True)
    assert len(task.sft_examples()) == 1 and sum(task.last_report.skipped.values()) == 3


def test_length_limits_are_counted_not_applied():
    task = TldrTask(path=fx("tldr/comparisons.jsonl"), max_prompt_chars=140, max_response_chars=50,
                    group_comparisons=False)
    examples = task.preference_examples()
    # Prompts: posts A (149 chars, 3 pairs) and B (147, 3 pairs) exceed 140; C (124) and D (127) do not.
    # Responses over 50: A's 60-char summary (pairs 0, 2), B's 54-char one (pairs 4, 5), C's 52 (pair 6);
    # B's 50-char summary (pair 3 alone) is not over.
    assert [len(ex.prompt) for ex in examples] == [149] * 3 + [147] * 3 + [124, 127, 127]
    assert task.last_report.truncated == {"prompt > 140 chars": 6, "response > 50 chars": 5}
    assert examples[0].responses[0] == " new cat hides under the bed all day and only eats at night."  # not cut


# -- ultrachat --------------------------------------------------------------------------------------

def test_ultrachat_one_example_per_assistant_turn():
    task = UltraChatTask(path=fx("ultrachat/ultrachat.jsonl"))
    examples = task.sft_examples()
    assert len(examples) == 6 and task.last_report.records == 3
    assert [len(ex.prompt) for ex in examples] == [1, 1, 3, 2, 4, 6]
    assert examples[3].prompt[0] == {"role": "system", "content": "You are a concise travel assistant."}
    assert examples[2].responses == ["Then maybe Earl Grey, or Professor Smokesworth."]
    assert all(isinstance(ex.responses[0], str) and ex.prompt[-1]["role"] == "user" for ex in examples)
    evals = task.eval_examples()
    assert len(evals) == 3 and evals[1].target == "How about Ash?"
    with pytest.raises(ValueError, match="ultrafeedback"):
        task.preference_examples()


def test_ultrachat_bad_file_skipped():
    task = UltraChatTask(path=fx("ultrachat/ultrachat_bad.jsonl"), skip_invalid=True)
    assert len(task.sft_examples()) == 1
    assert (task.last_report.records, sum(task.last_report.skipped.values())) == (7, 6)


# -- ultrafeedback ----------------------------------------------------------------------------------

def test_ultrafeedback_binarized_pairs_sft_and_eval():
    task = UltraFeedbackTask(path=fx("ultrafeedback/binarized.jsonl"))
    pairs = task.preference_examples()
    assert [ex.scores for ex in pairs] == [[8.5, 6.0], [7.0, 7.0], [9.0, 3.0]]
    assert pairs[0].prompt == [{"role": "user", "content": "Write a haiku about autumn."}]
    assert pairs[1].responses == ["12 times 12 is 144.", "144"]
    sft = task.sft_examples()
    assert len(sft) == 3 and sft[2].responses == ["11 is a prime number greater than 10."]
    evals = task.eval_examples()
    assert len(evals) == 3 and evals[0].target.startswith("Red leaves")


def test_ultrafeedback_raw_rankings_by_each_key():
    def ranked(rank_by):
        return UltraFeedbackTask(path=fx("ultrafeedback/raw.jsonl"), rank_by=rank_by).preference_examples()

    overall = ranked("overall_score")
    assert [ex.scores for ex in overall] == [[8.0, 8.0, 7.5, 4.0], [9.0, 6.0, 6.0, 3.5]]
    assert overall[0].meta["models"] == ["gpt-4", "llama-2-13b-chat", "alpaca-7b", "falcon-40b-instruct"]
    assert overall[1].meta["models"] == ["gpt-3.5-turbo", "vicuna-33b", "wizardlm-13b", "pythia-12b"]
    assert overall[0].prompt == [{"role": "user", "content": "Explain photosynthesis in one sentence."}]
    helpful = ranked("helpfulness")
    assert helpful[0].scores == [5.0, 4.0, 4.0, 2.0]  # ratings "5", "4", "4", "2": a tie, dataset order kept
    assert helpful[0].meta["models"] == ["gpt-4", "alpaca-7b", "llama-2-13b-chat", "falcon-40b-instruct"]
    assert ranked("fine_grained_score")[0].scores == [4.75, 4.5, 3.75, 2.25]
    assert ranked("instruction_following")[1].scores == [5.0, 4.0, 4.0, 2.0]
    # Record 1 rates one completion's honesty "N/A": a bad value when ranking by honesty.
    error = assert_rejects(lambda: ranked("honesty"), "raw.jsonl", 1, "completions[0].annotations.honesty.Rating")
    assert "N/A" in error.reason
    two = UltraFeedbackTask(path=fx("ultrafeedback/raw.jsonl"), ranking_length=2).preference_examples()
    assert two[0].scores == [8.0, 4.0]
    sft = UltraFeedbackTask(path=fx("ultrafeedback/raw.jsonl")).sft_examples()
    assert [ex.responses[0][:14] for ex in sft] == ["Photosynthesis", "The traditiona"]


def test_ultrafeedback_format_detection_and_settings():
    with pytest.raises(DataError, match="'instruction'"):
        UltraFeedbackTask(path=fx("ultrafeedback/binarized.jsonl"), format="raw").preference_examples()
    with pytest.raises(DataError, match="cannot tell the format"):
        UltraFeedbackTask(path=fx("ultrachat/ultrachat.jsonl")).preference_examples()
    with pytest.raises(ValueError, match="task.rank_by"):
        UltraFeedbackTask(rank_by="stars")
    with pytest.raises(ValueError, match="task.format"):
        UltraFeedbackTask(format="pairs")
    task = UltraFeedbackTask(format="raw")
    with pytest.raises(ValueError, match="task.eval_split"):
        task.eval_examples()
    assert UltraFeedbackTask()._split("train", 0) == "train_prefs"
    assert UltraFeedbackTask()._split("train", 1) == "train_sft"


def test_ultrafeedback_bad_files_strict_and_skipped():
    path = fx("ultrafeedback/binarized_bad.jsonl")
    assert_rejects(UltraFeedbackTask(path=path).preference_examples, "binarized_bad.jsonl", 1, "score_chosen")
    task = UltraFeedbackTask(path=path, skip_invalid=True)
    assert len(task.preference_examples()) == 1 and sum(task.last_report.skipped.values()) == 5
    raw = fx("ultrafeedback/raw_bad.jsonl")
    assert_rejects(UltraFeedbackTask(path=raw).preference_examples, "raw_bad.jsonl", 2, "completions[1].response")
    assert_rejects(UltraFeedbackTask(path=raw, rank_by="helpfulness").preference_examples, "raw_bad.jsonl", 1,
                   "completions[1].annotations.helpfulness.Rating")
    task = UltraFeedbackTask(path=raw, skip_invalid=True)
    assert len(task.preference_examples()) == 2
    assert task.last_report.skipped == {
        "completions: empty text": 1, "completions: not a number: 'high'": 1,
        "completions: is null": 1, "instruction: missing field": 1}
    # By helpfulness, record 3's bad overall_score does not matter, and record 1's "N/A" rating does.
    task = UltraFeedbackTask(path=raw, skip_invalid=True, rank_by="helpfulness")
    assert [ex.meta["index"] for ex in task.preference_examples()] == [0, 3]
    assert task.last_report.skipped["completions: rating is N/A"] == 1
    assert sum(task.last_report.skipped.values()) == 4


# -- hh ---------------------------------------------------------------------------------------------

def test_hh_pairs_with_multi_turn_prompts():
    task = HhTask(path=fx("hh/hh.jsonl"))
    pairs = task.preference_examples()
    assert len(pairs) == 3
    assert pairs[0].prompt == [{"role": "user", "content": "How do I keep basil alive indoors?"}]
    assert pairs[1].prompt == [{"role": "user", "content": "Can you recommend a book?"},
                               {"role": "assistant", "content": "Sure, what genres do you like?"},
                               {"role": "user", "content": "Science fiction, something short."}]
    assert pairs[1].responses[1] == "No."
    # Responses that start alike: the prompt still ends at the last shared "Assistant:".
    assert pairs[2].responses == ["I think it is best to avoid it: raw flour and raw eggs can carry bacteria.",
                                  "I think it is totally fine, eat as much as you want."]
    text = HhTask(path=fx("hh/hh.jsonl"), chat_format="text").preference_examples()
    assert text[0].prompt == "\n\nHuman: How do I keep basil alive indoors?\n\nAssistant:"
    assert text[0].responses[1] == " Basil is a plant."
    sft = task.sft_examples()
    assert [ex.n for ex in sft] == [1, 1, 1] and sft[1].responses[0].startswith("Try ")
    assert [ex.target for ex in task.eval_examples()] == [ex.responses[0] for ex in pairs]


def test_hh_transcript_helpers():
    assert split_transcripts("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c") == \
        ("\n\nHuman: a\n\nAssistant:", "b", "c")
    assert split_transcripts("\n\nHuman: a", "\n\nHuman: b") is None
    assert transcript_to_messages("\n\nAssistant: x\n\nHuman: y\n\nAssistant:") is None


def test_hh_bad_file_skipped():
    task = HhTask(path=fx("hh/hh_bad.jsonl"), skip_invalid=True)
    assert len(task.preference_examples()) == 1 and sum(task.last_report.skipped.values()) == 5
    # The raw transcript format does not need a leading Human turn.
    text = HhTask(path=fx("hh/hh_bad.jsonl"), skip_invalid=True, chat_format="text")
    assert len(text.preference_examples()) == 2


# -- mt ---------------------------------------------------------------------------------------------

def test_mt_three_way_rankings_per_direction():
    task = TranslationTask(path=fx("mt/alma_cs_en.jsonl"))
    examples = task.preference_examples()
    assert [ex.meta["direction"] for ex in examples] == ["cs-en", "en-cs", "en-cs", "cs-en", "en-cs"]
    assert [ex.meta["systems"] for ex in examples] == [
        ["gpt4", "ref", "alma"], ["gpt4", "ref", "alma"], ["alma", "gpt4", "ref"],
        ["ref", "gpt4", "alma"], ["ref", "gpt4", "alma"]]
    assert examples[0].scores == [0.90, 0.87, 0.82]
    assert examples[3].scores == [0.91, 0.80, 0.80] and examples[4].scores == [0.93, 0.93, 0.75]  # ties
    assert examples[0].prompt == "Translate this from Czech to English:\nCzech: Kočka spí na parapetu.\nEnglish:"
    assert examples[1].prompt == "Translate this from English to Czech:\nEnglish: The cat is sleeping on the " \
                                 "windowsill.\nCzech:"
    assert examples[0].responses[0] == " The cat is asleep on the windowsill."
    assert examples[0].target == " The cat is sleeping on the windowsill."  # the reference
    xcomet = TranslationTask(path=fx("mt/alma_cs_en.jsonl"), rank_by="kiwi").preference_examples()
    assert xcomet[2].scores == [0.90, 0.85, 0.80]
    one_way = TranslationTask(path=fx("mt/alma_cs_en.jsonl"), directions=["cs-en"])
    assert len(one_way.preference_examples()) == 2
    assert sum(one_way.last_report.filtered.values()) == 1  # record 1 requires en-cs


def test_mt_parallel_sft_and_eval():
    assert len(TranslationTask(sft_path=fx("mt/parallel.jsonl")).sft_examples()) == 3
    # Plain {source, target} records without languages take the first of task.directions.
    plain = TranslationTask(sft_path=fx("mt/parallel.jsonl"), directions=["en-cs"]).sft_examples()
    assert plain[0].prompt == "Translate this from English to Czech:\nEnglish: Dnes je hezky.\nCzech:"
    reverse = TranslationTask(sft_path=fx("mt/parallel.jsonl")).sft_examples()
    assert reverse[2].prompt == "Translate this from Czech to English:\nCzech: Mám rád čaj.\nEnglish:"
    assert reverse[2].responses == [" I like tea."]
    both = TranslationTask(sft_path=fx("mt/human_parallel.jsonl")).sft_examples()
    assert [ex.meta["direction"] for ex in both] == ["cs-en", "en-cs", "cs-en", "en-cs"]
    evals = TranslationTask(eval_path=fx("mt/wmt22.jsonl")).eval_examples()
    assert len(evals) == 2 and evals[1].target == " The library is closed."


def test_mt_settings_are_checked():
    with pytest.raises(ValueError, match="task.rank_by"):
        TranslationTask(rank_by="bleu")
    with pytest.raises(ValueError, match="task.directions"):
        TranslationTask(directions=["de-en"])
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        TranslationTask(language_pairs=["xx-en"])


def test_mt_bad_files_skipped():
    task = TranslationTask(path=fx("mt/alma_bad.jsonl"), skip_invalid=True)
    assert len(task.preference_examples()) == 2 and sum(task.last_report.skipped.values()) == 5
    sft = TranslationTask(sft_path=fx("mt/parallel_bad.jsonl"))
    assert_rejects(sft.sft_examples, "parallel_bad.jsonl", 1, "target")
    sft = TranslationTask(sft_path=fx("mt/parallel_bad.jsonl"), skip_invalid=True)
    assert len(sft.sft_examples()) == 1
    assert sft.last_report.skipped == {"target: empty text": 1, "translation.en: missing field": 1,
                                       next(k for k in sft.last_report.skipped if k.startswith("<record>")): 1}


# -- custom -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,prompt,responses", [
    ("pref_standard", "The sky is", [" blue.", " green."]),
    ("pref_conversational", [{"role": "user", "content": "What color is the sky?"}], ["It is blue.", "It is green."]),
    ("pref_implicit_standard", "The sky is", [" blue.", " green."]),
    ("pref_implicit_conversational", [{"role": "user", "content": "What color is the sky?"}],
     ["It is blue.", "It is green."]),
])
def test_custom_preference_formats(name, prompt, responses):
    task = CustomTask(path=fx(f"custom/{name}.jsonl"))
    examples = task.preference_examples()
    assert len(examples) == 2 and task.last_report.records == 2
    assert (examples[0].prompt, examples[0].responses) == (prompt, responses)
    assert len(task.sft_examples()) == 2  # the chosen responses as demonstrations


def test_custom_implicit_multi_turn_and_listwise():
    multi = CustomTask(path=fx("custom/pref_implicit_conversational.jsonl")).preference_examples()[1]
    assert [m["role"] for m in multi.prompt] == ["user", "assistant", "user"]
    assert multi.responses == ["Octopuses have three hearts.", "The moon is made of cheese."]
    listwise = CustomTask(path=fx("custom/listwise.jsonl")).preference_examples()
    assert listwise[0].responses == ["Mars.", "Jupiter.", "Pluto.", "The Sun."]  # tie keeps given order
    assert listwise[0].scores == [5.0, 5.0, 2.0, 0.5]
    assert listwise[1].scores == [1.0, 0.0, 0.0] and listwise[1].responses[0] == "Gracias."
    top2 = CustomTask(path=fx("custom/listwise.jsonl"), ranking_length=2).preference_examples()
    assert [ex.responses for ex in top2] == [["Mars.", "The Sun."], ["Gracias.", "Danke."]]
    assert common_string_prefix("The sky is blue.", "The sky is green.") == len("The sky is")


def test_custom_sft_formats_and_forced_format():
    completion = CustomTask(path=fx("custom/sft_completion.jsonl")).sft_examples()
    assert [ex.responses for ex in completion] == [[" chat"], ["chien"]]
    messages = CustomTask(path=fx("custom/sft_messages.jsonl")).sft_examples()
    assert len(messages) == 3 and [ex.responses[0] for ex in messages] == ["Hello!", "4", "6"]
    with pytest.raises(DataError, match="has no preferences"):
        CustomTask(path=fx("custom/sft_messages.jsonl")).preference_examples()
    with pytest.raises(DataError, match="'responses'"):
        CustomTask(path=fx("custom/pref_standard.jsonl"), format="listwise").preference_examples()


def test_custom_bad_files_skipped():
    task = CustomTask(path=fx("custom/listwise_bad.jsonl"), skip_invalid=True)
    assert len(task.preference_examples()) == 1 and sum(task.last_report.skipped.values()) == 5
    assert task.last_report.skipped["scores: score is nan"] == 1
    assert math.isfinite(task.preference_examples()[0].scores[0])


# -- bad records, every task: one table ----------------------------------------------------------------
# (task, fixture, stage, record index, the field the error names, words of its reason). Each bad record is
# loaded after the file's first (good) record, as the raw line it is (NaN stays NaN), and strict loading
# must stop at it naming the file, record 1 and the field.
BAD_RECORDS = [
    *[(TldrTask, "tldr/comparisons_bad.jsonl", "preference", i, f, r) for i, f, r in
      [(1, "choice", "out of range"), (2, "summaries[1].text", "empty text"), (3, "info.post", "missing field"),
       (4, "summaries", "expected a list of 2"), (5, "choice", "expected 0 or 1"), (7, "<record>", "invalid JSON")]],
    *[(UltraChatTask, "ultrachat/ultrachat_bad.jsonl", "sft", i, f, r) for i, f, r in
      [(1, "messages", "missing field"), (2, "messages[1].content", "empty text"),
       (3, "messages[1].role", "unknown role"), (4, "messages", "expected a list"),
       (5, "messages", "no assistant turn"), (6, "messages[0]", "starts with an assistant")]],
    *[(UltraFeedbackTask, "ultrafeedback/binarized_bad.jsonl", "preference", i, f, r) for i, f, r in
      [(1, "score_chosen", "score is nan"), (2, "rejected", "expected a list"),
       (3, "chosen[1].role", "assistant's answer"), (4, "prompt", "missing field"), (5, "score_chosen", "scores lower")]],
    *[(HhTask, "hh/hh_bad.jsonl", "preference", i, f, r) for i, f, r in
      [(1, "rejected", "missing field"), (2, "chosen", "no 'Assistant:' turn"), (3, "rejected", "empty response"),
       (4, "chosen", "expected a string"), (5, "chosen", "does not start with 'Human:'")]],
    *[(TranslationTask, "mt/alma_bad.jsonl", "preference", i, f, r) for i, f, r in
      [(1, "translation.gpt4_en_kiwi_xcomet", "score is nan"), (2, "translation.alma_cs", "missing field"),
       (3, "translation.language_pair", "'cs_en'"), (4, "translation.en", "empty text"),
       (5, "translation", "missing field")]],
    *[(CustomTask, "custom/listwise_bad.jsonl", "preference", i, f, r) for i, f, r in
      [(1, "scores[1]", "score is nan"), (2, "scores", "3 responses"), (3, "responses[0]", "empty text"),
       (4, "prompt", "missing field"), (5, "scores[0]", "not a number")]],
    *[(CustomTask, "custom/pref_bad.jsonl", "preference", i, f, r) for i, f, r in
      [(1, "prompt", "share no prefix"), (2, "chosen", "got int"), (3, "rejected", "both")]],
]


@pytest.mark.parametrize("task_class,file,stage,index,field,reason", BAD_RECORDS,
                         ids=[f"{file}:{index}" for _, file, _, index, _, _ in BAD_RECORDS])
def test_bad_record_names_its_file_record_and_field(tmp_path, task_class, file, stage, index, field, reason):
    lines = (FIXTURES / file).read_text().splitlines()
    path = tmp_path / "one.jsonl"
    path.write_text(lines[0] + "\n" + lines[index] + "\n")
    task = task_class(path=str(path), **({"group_comparisons": False} if task_class is TldrTask else {}))
    load = task.sft_examples if stage == "sft" else task.preference_examples
    error = assert_rejects(load, "one.jsonl", 1, field)
    assert reason in error.reason


# -- configs ----------------------------------------------------------------------------------------

REAL_TASKS = ("custom", "hh", "mt", "tldr", "ultrachat", "ultrafeedback")


def test_every_task_config_instantiates_with_the_common_keys(compose):
    from omegaconf import OmegaConf

    from alignexp.config import build_task
    from alignexp.tasks.base import Task

    conf = Path(__file__).resolve().parents[2] / "conf" / "task"
    # imdb, like synthetic, samples its preferences and has a gold reward (tests/real/)
    assert sorted(p.stem for p in conf.glob("*.yaml")) == sorted((*REAL_TASKS, "imdb", "synthetic"))
    for name in REAL_TASKS:
        cfg = OmegaConf.to_container(compose(f"task={name}").task)
        task = build_task(cfg)
        assert cfg["name"] == name and cfg["_target_"] == f"alignexp.tasks.{name}.{type(task).__name__}"
        for key in ("path", "ranking_length", "skip_invalid", "max_records", "max_eval_examples"):
            assert key in cfg, (name, key)  # from task/common/records.yaml
        assert cfg["path"] is None and cfg["skip_invalid"] is False and cfg["ranking_length"] is None
        assert isinstance(task, Task) and task.has_gold_reward is False and task.name == name
        assert not task.trains_sft_policy and not task.samples_preferences


def test_max_records_reads_a_prefix():
    task = TldrTask(path=fx("tldr/comparisons.jsonl"), max_records=4)
    examples = task.preference_examples()
    assert task.last_report.records == 4 and [ex.n for ex in examples] == [3, 2]


def test_train_means_the_configured_split():
    # train.py and the samplers pass "train" (the Task protocol's default): the config's split wins.
    task = CustomTask(path=fx("custom/folder"), split="test")
    assert len(task.preference_examples("train")) == 1 and task.last_report.source.endswith("test.jsonl")
    assert len(CustomTask(path=fx("custom/folder")).preference_examples("test")) == 1
    assert UltraFeedbackTask()._split("train", 0) == "train_prefs"
    assert UltraFeedbackTask(sft_split="test_sft")._split("train", 1) == "test_sft"
    assert UltraFeedbackTask()._split("test", 2) == "test_prefs"
