"""AlpacaEval / MT-Bench answer files and MT-Bench grading, against the formats (alignexp/evaluation/exports.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignexp.evaluation import exports
from alignexp.tasks.base import DataError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eval"


class RecordingGenerator:
    """A stand-in for the model: answers "answer <k> to <last user message>" and records its calls."""

    def __init__(self):
        self.calls: list[tuple[list, list, list]] = []

    def __call__(self, chats, temperatures, seeds):
        self.calls.append(([list(c) for c in chats], list(temperatures), list(seeds)))
        return [f"answer {sum(m['role'] == 'assistant' for m in chat) + 1} to {chat[-1]['content'][:12]}"
                for chat in chats]


def test_alpaca_eval_model_outputs_format(tmp_path):
    records = exports.read_alpaca_eval(FIXTURES / "alpaca_eval.json")
    generator = RecordingGenerator()
    outputs = exports.alpaca_eval_outputs(records, generator, "my-model", temperature=0.0, seed=1, chunk=2)
    path = exports.write_json(tmp_path / "model_outputs.json", outputs)
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, list) and len(loaded) == 3
    for record, source in zip(loaded, records):
        assert {"instruction", "output", "generator"} <= set(record)
        assert record["instruction"] == source["instruction"] and record["generator"] == "my-model"
        assert record["output"].startswith("answer 1 to ")
        assert record.get("dataset") == source.get("dataset")  # other fields are kept
    # The reference outputs of the eval set are replaced by the model's, never kept by mistake.
    assert loaded[0]["output"] != records[0]["output"]
    assert [len(c[0]) for c in generator.calls] == [2, 1]  # chunks of 2
    assert generator.calls[0][0][0] == [{"role": "user", "content": records[0]["instruction"]}]
    assert generator.calls[0][1] == [0.0, 0.0]


def test_alpaca_eval_bad_record_names_file_record_and_field():
    with pytest.raises(DataError, match=r"alpaca_eval_bad.json, record 1 \(numbered from 0\), field 'instruction': missing field"):
        exports.read_alpaca_eval(FIXTURES / "alpaca_eval_bad.json")
    with pytest.raises(FileNotFoundError, match="no such question file"):
        exports.read_alpaca_eval(FIXTURES / "missing.json")


def test_mt_bench_answers_are_multi_turn_in_the_answer_file_format(tmp_path):
    questions = exports.read_mt_bench(FIXTURES / "mt_bench_question.jsonl")
    assert [q.category for q in questions] == ["writing", "math", "extraction"]
    assert questions[1].reference == ["Area is 3", "5pi"]
    generator = RecordingGenerator()
    answers = exports.mt_bench_answers(questions, generator, "my-model", seed=0)
    path = exports.write_jsonl(tmp_path / "model_answer" / "my-model.jsonl", answers)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3
    for line, question in zip(lines, questions):
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["question_id"] == question.question_id and line["model_id"] == "my-model"
        assert isinstance(line["answer_id"], str) and isinstance(line["tstamp"], float)
        assert line["choices"] == [{"index": 0, "turns": line["choices"][0]["turns"]}]
        assert len(line["choices"][0]["turns"]) == 2
    assert len({line["answer_id"] for line in lines}) == 3
    # Turn 2 is asked in the chat that holds turn 1 and the model's own first answer.
    (first_chats, first_temps, first_seeds), (second_chats, _, second_seeds) = generator.calls
    assert first_chats[0] == [{"role": "user", "content": questions[0].turns[0]}]
    assert second_chats[0] == [{"role": "user", "content": questions[0].turns[0]},
                               {"role": "assistant", "content": lines[0]["choices"][0]["turns"][0]},
                               {"role": "user", "content": questions[0].turns[1]}]
    assert lines[0]["choices"][0]["turns"][1].startswith("answer 2 to ")
    # FastChat's temperatures per category: writing 0.7, math 0.0, extraction 0.0.
    assert first_temps == [0.7, 0.0, 0.0]
    assert len(set(first_seeds + second_seeds)) == 6  # one random stream per question and turn


def test_mt_bench_bad_question_names_the_field():
    with pytest.raises(DataError, match=r"record 1 \(numbered from 0\), field 'turns': expected a non-empty list of strings"):
        exports.read_mt_bench(FIXTURES / "mt_bench_question_bad.jsonl")


@pytest.mark.parametrize(("reply", "rating"), [
    ("The answer is helpful and correct.\n\nRating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("[[10]] overall, though [[3]] for style", 10.0),  # the first [[x]] counts
    ("I would give it [6] out of 10.", 6.0),  # FastChat's backup pattern: single brackets
    ("Rating: 7/10", -1.0),  # no bracketed rating: -1, left out of the means
    ("", -1.0),
])
def test_parse_rating_as_fastchat(reply, rating):
    assert exports.parse_rating(reply) == rating


def test_judge_prompts_follow_fastchat():
    questions = exports.read_mt_bench(FIXTURES / "mt_bench_question.jsonl")
    name, messages = exports.judge_prompt(questions[0], ["first answer", "second answer"], turn=1)
    assert name == "single-v1"
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    user = messages[1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert 'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".' in user
    assert user.endswith(f"[Question]\n{questions[0].turns[0]}\n\n[The Start of Assistant's Answer]\n"
                         "first answer\n[The End of Assistant's Answer]")
    name, messages = exports.judge_prompt(questions[0], ["first answer", "second answer"], turn=2)
    assert name == "single-v1-multi-turn"
    assert "focus on the assistant's answer to the second user question" in messages[0]["content"]
    assert f"### User:\n{questions[0].turns[1]}\n\n### Assistant A:\nsecond answer" in messages[1]["content"]
    # A math question with reference answers gets the reference-guided prompt.
    name, messages = exports.judge_prompt(questions[1], ["3", "5pi"], turn=1)
    assert name == "single-math-v1"
    assert "[The Start of Reference Answer]\nArea is 3\n[The End of Reference Answer]" in messages[1]["content"]
    name, messages = exports.judge_prompt(questions[1], ["3", "5pi"], turn=2)
    assert name == "single-math-v1-multi-turn" and "### Reference answer:\n5pi" in messages[1]["content"]
    # A reasoning-type category without references falls back to the general prompt.
    assert exports.judge_prompt(questions[2], ["a", "b"], turn=1)[0] == "single-v1"


def test_grade_mt_bench_offline():
    """A fake judge rates turn 1 with [[8]], turn 2 with [[4]], and fails to format question 131's
    second rating: turn 1 mean 8 (3 ratings), turn 2 mean 4 (2 parsed, 1 unparsed), overall (8*3 + 4*2)/5."""
    questions = exports.read_mt_bench(FIXTURES / "mt_bench_question.jsonl")
    answers = exports.mt_bench_answers(questions, RecordingGenerator(), "my-model")
    prompts: list[list[dict]] = []

    def complete(messages):
        prompts.append(messages)
        if "<|The Start of Assistant A's Conversation" in messages[1]["content"]:  # a turn-2 prompt
            return "Unformatted: 3 out of 10" if "movie reviews" in messages[1]["content"] else "Rating: [[4]]"
        return "Good.\nRating: [[8]]"

    records, scores = exports.grade_mt_bench(questions, answers, complete, judge_model="judge-x")
    assert len(records) == 6 and len(prompts) == 6
    assert {tuple(r["judge"]) for r in records} == {("judge-x", "single-v1"), ("judge-x", "single-v1-multi-turn"),
                                                    ("judge-x", "single-math-v1"),
                                                    ("judge-x", "single-math-v1-multi-turn")}
    assert {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"} <= set(records[0])
    assert scores["turn_1"] == 8.0 and scores["turn_2"] == 4.0
    assert scores["turn_2_unparsed"] == 1 and scores["turn_1_unparsed"] == 0
    assert scores["overall"] == pytest.approx((8 * 3 + 4 * 2) / 5)
    with pytest.raises(KeyError, match="no answer for MT-Bench question 81"):
        exports.grade_mt_bench(questions, answers[1:], complete, "judge-x")


def test_mt_bench_grading_sends_fastchats_system_and_user_messages(tmp_path):
    """Through an LLM judge at a local endpoint: each grading request is FastChat's system message then its
    user prompt (``single-v1`` for turn 1, ``single-v1-multi-turn`` for turn 2), at temperature 0 with
    2,048 reply tokens, as FastChat's ``run_judge_single`` sends them; the user prompt is recorded."""
    from alignexp.judges.llm import LLMJudge
    from tests.fixtures.llm_server import LLMServer

    questions = exports.read_mt_bench(FIXTURES / "mt_bench_question.jsonl")[:1]
    answers = exports.mt_bench_answers(questions, RecordingGenerator(), "my-model")
    turns = answers[0]["choices"][0]["turns"]
    with LLMServer("good") as server:
        judge = LLMJudge(server.base_url, "judge-model", api_key_env=None, max_workers=1, cache_dir=tmp_path)
        records, _ = exports.grade_mt_bench(questions, answers, exports.chat_completion(judge), "judge-model")
    sent = [r["body"] for r in server.requests]
    assert [b["messages"] for b in sent] == [exports.judge_prompt(questions[0], turns, 1)[1],
                                             exports.judge_prompt(questions[0], turns, 2)[1]]
    single, multi = exports.JUDGE_PROMPTS["single-v1"], exports.JUDGE_PROMPTS["single-v1-multi-turn"]
    assert sent[0]["messages"][0] == {"role": "system", "content": single["system_prompt"]}
    assert sent[0]["messages"][1] == {"role": "user", "content": single["prompt_template"].format(
        question=questions[0].turns[0], answer=turns[0])}
    assert sent[1]["messages"][0] == {"role": "system", "content": multi["system_prompt"]}
    assert sent[1]["messages"][1]["content"].startswith("<|The Start of Assistant A's Conversation with User|>")
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 2048 and b["model"] == "judge-model" for b in sent)
    assert [r["user_prompt"] for r in records] == [b["messages"][1]["content"] for b in sent]


def test_engine_generator_answers_two_turns_with_the_tiny_model():
    """The real path through the chat template and the sampling engine, on the 2-layer model."""
    from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer

    args = ModelArgs(arch={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                           "max_position_embeddings": 1024})
    tokenizer = build_tokenizer(args)
    model = build_model(args, tokenizer)
    generate = exports.engine_generator(model, tokenizer, max_new_tokens=4, batch_size=2)
    questions = exports.read_mt_bench(FIXTURES / "mt_bench_question.jsonl")
    answers = exports.mt_bench_answers(questions, generate, "tiny", seed=0)
    again = exports.mt_bench_answers(questions, generate, "tiny", seed=0)
    assert [a["choices"] for a in answers] == [a["choices"] for a in again]  # seeded, reproducible
    assert all(len(a["choices"][0]["turns"]) == 2 for a in answers)
