"""Judges: one interface (score, compare, rank); the LLM judge against a local OpenAI-compatible server
(answers well, garbage, stalls, 429/500/401), with bounded retries, abstentions, a disk cache, and the
API key kept out of everything it writes."""

from __future__ import annotations

import json
import math
import time

import pytest

from alignexp.errors import ConfigError
from alignexp.judges import GoldJudge, build_judge, rank_by_comparisons
from alignexp.judges.base import Judge, ranked_example
from alignexp.judges.llm import PROMPTS, JudgeConfigError, LLMJudge, parse_rating, parse_verdict
from alignexp.tasks.loading import RecordTask
from alignexp.tasks.synthetic import SyntheticTask
from tests.fixtures.llm_server import LLMServer

KEY = "sk-test-SECRET-0123456789"


def fast_judge(server: LLMServer, **kwargs) -> LLMJudge:
    settings = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "max_workers": 4,
                "api_key_env": "ALIGNEXP_TEST_JUDGE_KEY"}
    return LLMJudge(server.base_url, "test-model", **{**settings, **kwargs})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ALIGNEXP_TEST_JUDGE_KEY", KEY)


# -- gold judge and the shared interface --------------------------------------------------------------
def test_gold_judge_scores_compares_and_ranks():
    task = SyntheticTask(n_sft=8, n_train_prompts=4, n_eval_prompts=4)
    judge = GoldJudge(task)
    assert isinstance(judge, Judge)
    # alphabet of 16: a-d are +1, m-p are -1, the rest 0
    assert judge.score(["x:", "x:"], ["aaaa", "aamm"]) == [1.0, 0.0]
    assert judge.compare(["x:"] * 3, ["aa", "mm", "ee"], ["mm", "aa", "ff"]) == [1.0, 0.0, 0.5]
    ranked = judge.rank("x:", ["mmmm", "aaaa", "eeee"], meta={"index": 7})
    assert ranked.responses == ["aaaa", "eeee", "mmmm"]
    assert ranked.scores == [1.0, 0.0, -1.0]
    assert ranked.meta == {"index": 7, "judge": "gold", "order": [1, 2, 0]}
    many = judge.rank_all(["x:", "y:"], [["ee", "aa"], ["mm"]])
    assert [ex.responses for ex in many] == [["aa", "ee"], ["mm"]]


def test_ranked_example_keeps_ties_in_order_and_refuses_nan():
    ex = ranked_example("p", ["a", "b", "c"], [1.0, 2.0, 1.0], "j")
    assert ex.responses == ["b", "a", "c"] and ex.meta["order"] == [1, 0, 2]
    with pytest.raises(ValueError, match="NaN"):
        ranked_example("p", ["a", "b"], [1.0, math.nan], "j")


def test_rank_by_comparisons_counts_wins():
    class LongerWins:
        name = "longer"

        def compare(self, prompts, first, second):
            return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]

    ranked = rank_by_comparisons(LongerWins(), "p", ["bb", "a", "cccc", "dd"])
    # wins: "cccc" 3, "bb" 1.5, "dd" 1.5, "a" 0  (the two of length 2 tie)
    assert ranked.responses == ["cccc", "bb", "dd", "a"]
    assert ranked.scores == [3.0, 1.5, 1.5, 0.0]


def test_build_judge_from_group_options_and_errors_name_the_key(tmp_path):
    synthetic, real = SyntheticTask(n_sft=8, n_train_prompts=4, n_eval_prompts=4), RecordTask("tldr")
    gold = {"_target_": "alignexp.judges.gold.GoldJudge", "name": "gold"}
    assert isinstance(build_judge(gold, synthetic), GoldJudge)
    assert isinstance(build_judge({"name": "auto"}, synthetic), GoldJudge)
    assert build_judge({"name": "auto"}, real) is None and build_judge({"name": "none"}, synthetic) is None
    with pytest.raises(ConfigError, match="sampler.judge.name=gold: task 'tldr' has no gold reward"):
        build_judge(gold, real, key="sampler.judge")
    with pytest.raises(ConfigError, match="judge: no _target_"):
        build_judge({"name": "oracle"}, real)
    llm = {"_target_": "alignexp.judges.llm.LLMJudge", "name": "llm", "base_url": None, "model": "m"}
    with pytest.raises(ConfigError, match="ppo.judge.base_url"):
        build_judge(llm, real, key="ppo.judge")
    with pytest.raises(ConfigError, match="judge.path"):
        build_judge({"_target_": "alignexp.judges.reward_model.RewardModelJudge", "name": "reward_model",
                     "path": None}, real)


# -- parsing ------------------------------------------------------------------------------------------
def test_parse_verdict_and_rating():
    assert parse_verdict("Comparison: B is terse.\nPreferred: B", "Preferred") == "B"
    assert parse_verdict('Comparison: x\nPreferred: "A"', "Preferred") == "A"
    assert parse_verdict("Preferred: A\n...on reflection\nPreferred: B", "Preferred") == "B"
    assert parse_verdict("More helpful: <A>", "More helpful") == "A"
    assert parse_verdict("I like A better.", "Preferred") is None
    assert parse_rating("ok\nRating: [[7]]") == 7.0
    assert parse_rating("Rating: [[11]]") is None and parse_rating("Rating: 7") is None


def test_prompts_are_the_dpo_papers():
    s = PROMPTS["summarization"].format(prompt="POST", a="SA", b="SB")
    assert s.startswith("Which of the following summaries does a better job of summarizing the most important "
                        "points in the given forum post?")
    assert "Post:\nPOST\n\nSummary A:\nSA\n\nSummary B:\nSB" in s and s.endswith('Preferred: <"A" or "B">')
    c = PROMPTS["summarization_concise"].format(prompt="P", a="A", b="B")
    assert "A good summary is both precise and concise." in c
    d = PROMPTS["dialogue"].format(prompt="Q", a="RA", b="RB")
    assert d.startswith("For the following query to a chatbot, which response is more helpful?\n\nQuery: Q")
    assert d.endswith('More helpful: <"A" or "B">')


# -- the LLM judge against a local server ---------------------------------------------------------------
def test_llm_judge_answers_well_in_both_orders(tmp_path):
    with LLMServer("good") as server:
        judge = fast_judge(server, cache_dir=tmp_path / "cache")
        verdicts = judge.compare(["post 1", "post 2", "post 3"], ["a long summary", "short", "same1"],
                                 ["short", "a long summary", "same2"])
        assert verdicts == [1.0, 0.0, 0.5]  # equal lengths: the server says A in both orders, a split vote
        assert len(server.requests) == 6  # each pair asked in both orders
        request = server.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        assert request["body"]["model"] == "test-model" and request["body"]["temperature"] == 0.0
        assert "Which of the following summaries" in request["body"]["messages"][0]["content"]
    assert judge.stats["abstentions"] == 0
    # the key is nowhere in what the judge writes or shows
    written = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert written and KEY not in written
    assert KEY not in repr(judge) and KEY not in json.dumps(dict(judge.stats))
    assert not any(KEY in json.dumps(r["body"]) for r in server.requests)


def test_llm_judge_cancels_position_bias():
    with LLMServer("biased") as server:
        judge = fast_judge(server)
        assert judge.compare(["p", "q"], ["x", "longer text"], ["longer text", "x"]) == [0.5, 0.5]
    assert judge.stats["abstentions"] == 0


def test_llm_judge_cache_answers_reruns(tmp_path):
    with LLMServer("good") as server:
        first = fast_judge(server, cache_dir=tmp_path)
        assert first.compare(["p"], ["long answer"], ["short"]) == [1.0]
        second = fast_judge(server, cache_dir=tmp_path)
        assert second.compare(["p"], ["long answer"], ["short"]) == [1.0]
        assert second.compare(["p"], ["short"], ["long answer"]) == [0.0]  # the swapped pair: same requests
        assert len(server.requests) == 2
    assert second.stats["cache_hits"] == 4 and second.stats["requests"] == 0


@pytest.mark.parametrize("mode, failure", [("garbage", "failed_unparseable"), ("bad_json", "failed_unparseable"),
                                           ("429", "failed_http_429"), ("500", "failed_http_500")])
def test_llm_judge_abstains_after_bounded_retries(mode, failure):
    with LLMServer(mode) as server:
        judge = fast_judge(server, max_retries=2)
        assert judge.compare(["p", "q"], ["a", "b"], ["c", "d"]) == [0.5, 0.5]
        assert len(server.requests) == 2 * 2 * 3  # 2 pairs x 2 orders x (1 + 2 retries)
    assert judge.abstentions == 2 and judge.stats[failure] == 12 and judge.stats["retries"] == 8
    assert judge.stats["abstained_requests"] == 4
    assert judge.faults() == "retries 8, failed 12, abstained 2"  # the progress bar's postfix


def test_llm_judge_times_out_and_abstains():
    with LLMServer("stall", stall_s=3.0) as server:
        judge = fast_judge(server, timeout_s=0.2, max_retries=1)
        start = time.time()
        assert judge.compare(["p"], ["a"], ["b"]) == [0.5]
        assert time.time() - start < 2.0  # 2 orders in parallel, 2 attempts of 0.2 s each
    assert judge.stats["failed_timeout"] == 4 and judge.abstentions == 1


def test_llm_judge_recovers_from_transient_failures():
    with LLMServer("flaky", fail_first=2) as server:
        judge = fast_judge(server, max_workers=1, max_retries=3)
        assert judge.compare(["p"], ["long answer"], ["short"]) == [1.0]
    assert judge.stats["retries"] == 2 and judge.stats["failed_http_500"] == 2 and judge.abstentions == 0


def test_llm_judge_config_errors_raise_without_the_key():
    with LLMServer("401") as server:
        judge = fast_judge(server)
        with pytest.raises(JudgeConfigError, match="ALIGNEXP_TEST_JUDGE_KEY") as error:
            judge.compare(["p"], ["a"], ["b"])
        assert KEY not in str(error.value)
        assert len(server.requests) <= 2  # no retries


def test_llm_judge_scores_and_ranks():
    with LLMServer("good") as server:
        judge = fast_judge(server, kind="dialogue")
        assert judge.score(["q", "q"], ["abc", "abcdefghijkl"]) == [3.0, 10.0]
        ranked = judge.rank([{"role": "user", "content": "hello?"}], ["hi", "hello there", "hey you"])
        assert ranked.responses == ["hello there", "hey you", "hi"] and ranked.meta["judge"] == "llm"
        content = server.requests[-1]["body"]["messages"][0]["content"]
        assert content.startswith("For the following query to a chatbot") and "Query: user: hello?" in content
        server.mode = "garbage"
        assert math.isnan(judge.score(["q"], ["zzz"])[0])
    assert judge.abstentions == 1


def test_llm_judge_speaks_chat_and_its_cache_key_covers_every_message(tmp_path):
    """A request is a list of messages: the judge's system message (where it has one) then the user
    message; ``chat`` sends any list as it is. Two requests that differ only in their system message are
    two requests (the cache key covers every message); the same messages again are a cache hit."""
    with LLMServer("good") as server:
        judge = fast_judge(server, cache_dir=tmp_path, system_prompt="You are a careful annotator.", max_workers=1)
        assert judge.compare(["p"], ["long answer"], ["short"]) == [1.0]
        messages = server.requests[0]["body"]["messages"]
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[0]["content"] == "You are a careful annotator."
        assert messages[1]["content"].startswith("Which of the following summaries")
        plain = fast_judge(server, cache_dir=tmp_path, max_workers=1)  # no system message: not cached
        assert plain.compare(["p"], ["long answer"], ["short"]) == [1.0]
        assert len(server.requests) == 4 and server.requests[2]["body"]["messages"][0]["role"] == "user"
        chat = [{"role": "system", "content": "Rate it."}, {"role": "user", "content": "Hello"}]
        assert judge.chat(chat, max_tokens=2048) == "I do not understand the question."
        assert server.requests[-1]["body"]["messages"] == chat and server.requests[-1]["body"]["max_tokens"] == 2048
        other_system = [{"role": "system", "content": "Rate it strictly."}, chat[1]]
        judge.chat(other_system, max_tokens=2048)
        judge.chat(chat, max_tokens=2048)  # asked before: from the cache
        assert len(server.requests) == 6 and judge.stats["cache_hits"] == 1
        with pytest.raises(ValueError, match="list of"):
            judge.chat([{"role": "judge", "content": "x"}])
