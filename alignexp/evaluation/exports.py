"""Answer files for AlpacaEval and MT-Bench from question files the user supplies (nothing is downloaded),
and MT-Bench single-answer grading with an LLM judge, in the formats docs/evaluation.md describes
(FastChat's prompts, temperatures and rating parser)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignexp.args import check_number
from alignexp.errors import AlignexpError, ConfigError
from alignexp.files import atomic_write_text
from alignexp.metrics.stats import mean_stderr
from alignexp.models.logprobs import encode_text
from alignexp.sampling.engine import SamplingParams, generate
from alignexp.sampling.text import decode, sample_seed
from alignexp.tasks.base import DataError, Message, get_field, text_field
from alignexp.tasks.loading import InvalidRecord, read_file

# FastChat fastchat/llm_judge/common.py: sampling temperature per MT-Bench category.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7
NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")


@dataclass
class ExportArgs:
    """``export`` (conf/evaluate.yaml): the question files (``alpaca_eval``: an AlpacaEval eval set;
    ``mt_bench``: MT-Bench's question.jsonl), the answers' ``model_id`` (null: the run folder's name),
    and generation settings (``temperature`` is AlpacaEval's; MT-Bench uses its per-category ones)."""

    alpaca_eval: str | None = None
    mt_bench: str | None = None
    model_id: str | None = None
    max_new_tokens: int = 1024
    temperature: float = 0.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_number("export.max_new_tokens", self.max_new_tokens, low=1, integer=True)
        check_number("export.batch_size", self.batch_size, low=1, integer=True)
        check_number("export.temperature", self.temperature, low=0)


class QuestionFileNotFound(AlignexpError, FileNotFoundError):
    """A question file named by ``export.alpaca_eval`` / ``export.mt_bench`` does not exist."""


Generate = Callable[[list[list[Message]], list[float], list[int]], list[str]]
"""``generate(chats, temperatures, seeds)``: one answer (text) per chat."""


# -- reading question files -----------------------------------------------------------------------------
def _records(path: str | Path) -> list[Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise QuestionFileNotFound(f"{path}: no such question file")
    records = list(read_file(path))
    for index, record in enumerate(records):
        if isinstance(record, InvalidRecord):
            raise DataError(str(path), index, "<record>", record.reason)
    return records


def read_alpaca_eval(path: str | Path) -> list[dict[str, Any]]:
    """The AlpacaEval eval set: a JSON (or JSONL) list of records with a non-empty ``instruction``."""
    records = _records(path)
    for index, record in enumerate(records):
        text_field(record, "instruction", str(path), index)
    if not records:
        raise DataError(str(path), None, "<file>", "no records")
    return records


@dataclass
class MtBenchQuestion:
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None


def read_mt_bench(path: str | Path) -> list[MtBenchQuestion]:
    """MT-Bench ``question.jsonl``: ``question_id``, ``category``, ``turns`` (non-empty strings), ``reference``?"""
    source = str(path)
    questions = []
    for index, record in enumerate(_records(path)):
        question_id = get_field(record, "question_id", source, index)
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
            raise DataError(source, index, "question_id", f"expected an integer or a string, got {question_id!r}")
        category = text_field(record, "category", source, index)
        turns = get_field(record, "turns", source, index)
        if not isinstance(turns, list) or not turns:
            raise DataError(source, index, "turns", "expected a non-empty list of strings")
        for j, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise DataError(source, index, f"turns[{j}]", "expected a non-empty string")
        reference = record.get("reference")
        if reference is not None and (not isinstance(reference, list)
                                      or not all(isinstance(r, str) for r in reference)):
            raise DataError(source, index, "reference", "expected a list of strings")
        questions.append(MtBenchQuestion(question_id, category, list(turns), reference))
    if not questions:
        raise DataError(source, None, "<file>", "no questions")
    return questions


# -- generation ----------------------------------------------------------------------------------------
def engine_generator(model, tokenizer, max_new_tokens: int, max_prompt_len: int = 2048,
                     batch_size: int = 16, top_p: float = 1.0) -> Generate:
    """A :data:`Generate` over the sampling engine: chats through the chat template, one seed per chat."""

    def _generate(chats: list[list[Message]], temperatures: list[float], seeds: list[int]) -> list[str]:
        out: list[str | None] = [None] * len(chats)
        for temperature in sorted(set(temperatures)):
            rows = [i for i, t in enumerate(temperatures) if t == temperature]
            params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                    top_p=top_p if temperature > 0 else 1.0)
            prompts = [encode_text(tokenizer, chats[i], is_prompt=True)[-max_prompt_len:] for i in rows]
            generations = generate(model, prompts, params, eos_id=tokenizer.eos_token_id,
                                   pad_id=tokenizer.pad_token_id, seeds=[seeds[i] for i in rows],
                                   batch_size=batch_size)
            for i, generation in zip(rows, generations):
                out[i] = decode(tokenizer, generation).strip()
        return [text or "" for text in out]

    return _generate


def _chunks(n: int, size: int, desc: str, progress: bool) -> Iterable[int]:
    starts = range(0, n, size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)
    return starts


def alpaca_eval_outputs(records: Sequence[dict[str, Any]], generate_fn: Generate, generator: str,
                        temperature: float = 0.0, seed: int = 0, chunk: int = 16,
                        progress: bool = False) -> list[dict[str, Any]]:
    """``model_outputs.json`` records: each input record with ``output`` (the answer) and ``generator``."""
    outputs: list[str] = []
    for start in _chunks(len(records), chunk, "AlpacaEval", progress):
        part = records[start:start + chunk]
        chats = [[{"role": "user", "content": r["instruction"]}] for r in part]
        outputs.extend(generate_fn(chats, [temperature] * len(part),
                                   [sample_seed(seed, start + i, 0) for i in range(len(part))]))
    return [{**record, "output": output, "generator": generator} for record, output in zip(records, outputs)]


def mt_bench_answers(questions: Sequence[MtBenchQuestion], generate_fn: Generate, model_id: str, seed: int = 0,
                     temperatures: dict[str, float] | None = None, chunk: int = 16,
                     progress: bool = False) -> list[dict[str, Any]]:
    """The MT-Bench answer file's records: turn k is answered in the chat holding turns < k and their answers."""
    table = {**MT_BENCH_TEMPERATURES, **(temperatures or {})}
    chats: list[list[Message]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    n_turns = max(len(q.turns) for q in questions)
    for turn in range(n_turns):
        rows = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        for start in _chunks(len(rows), chunk, f"MT-Bench turn {turn + 1}", progress):
            part = rows[start:start + chunk]
            for i in part:
                chats[i].append({"role": "user", "content": questions[i].turns[turn]})
            texts = generate_fn([list(chats[i]) for i in part],
                                [table.get(questions[i].category, DEFAULT_TEMPERATURE) for i in part],
                                [sample_seed(seed, i, turn) for i in part])
            for i, text in zip(part, texts):
                chats[i].append({"role": "assistant", "content": text})
                answers[i].append(text)
    now = time.time()
    return [{"question_id": q.question_id, "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
             "choices": [{"index": 0, "turns": turns}], "tstamp": now} for q, turns in zip(questions, answers)]


def write_json(path: str | Path, records: Any) -> Path:
    return atomic_write_text(path, json.dumps(records, indent=2, ensure_ascii=False))


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- MT-Bench single-answer grading --------------------------------------------------------------------
_INSTRUCTION = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. ")
_INSTRUCTION_MATH = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider correctness and helpfulness. You will "
    "be given a reference answer and the assistant's answer. ")
_RATE = ("Be as objective as possible. After providing your explanation, you must rate the response on a scale "
         "of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".")

JUDGE_PROMPTS: dict[str, dict[str, str]] = {
    # FastChat fastchat/llm_judge/data/judge_prompts.jsonl, verbatim (typos included).
    "single-v1": {
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": "[Instruction]\n" + _INSTRUCTION + "Begin your evaluation by providing a short "
        "explanation. " + _RATE + "\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
        "[The End of Assistant's Answer]"},
    "single-math-v1": {
        "system_prompt": "You are a helpful assistant.",
        "prompt_template": "[Instruction]\n" + _INSTRUCTION_MATH + "Begin your evaluation by comparing the "
        "assistant's answer with the reference answer. Identify and correct any mistakes. " + _RATE
        + "\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference "
        "Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"},
    "single-v1-multi-turn": {
        "system_prompt": _INSTRUCTION + "You evaluation should focus on the assistant's answer to the second user "
        "question. Begin your evaluation by providing a short explanation. " + _RATE + "\n\n",
        "prompt_template": "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
        "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
        "<|The End of Assistant A's Conversation with User|>"},
    "single-math-v1-multi-turn": {
        "system_prompt": "Please act as an impartial judge and evaluate the quality of the response provided by an "
        "AI assistant to the user question. Your evaluation should consider correctness and helpfulness. You will "
        "be given a reference answer and the assistant's answer. You evaluation should focus on the assistant's "
        "answer to the second question. Begin your evaluation by comparing the assistant's answer with the "
        "reference answer. Identify and correct any mistakes. " + _RATE + "\n\n",
        "prompt_template": "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
        "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of "
        "Reference Answer|>\n\n\n<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}"
        "\n\n### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The "
        "End of Assistant A's Conversation with User|>"},
}

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgment: str) -> float:
    """The 1-10 rating in a judge's reply: the first ``[[x]]``, else the first ``[x]``; -1 when there is none.

    As FastChat's ``run_judge_single``: "Rating: [[7]]" -> 7.0; "[[8.5]]" -> 8.5; "I'd say [6]" -> 6.0;
    "Rating: 7/10" -> -1.0 (unparsed ratings are -1 and left out of the means).
    """
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1.0


def judge_prompt(question: MtBenchQuestion, answers: Sequence[str], turn: int) -> tuple[str, list[Message]]:
    """The judge prompt's name and messages for ``turn`` (1 or 2) of an answered question."""
    reference = question.reference if question.category in NEED_REF_CATEGORIES and question.reference else None
    if turn == 1:
        name = "single-math-v1" if reference else "single-v1"
        values = {"question": question.turns[0], "answer": answers[0]}
    else:
        name = "single-math-v1-multi-turn" if reference else "single-v1-multi-turn"
        values = {"question_1": question.turns[0], "question_2": question.turns[1],
                  "answer_1": answers[0], "answer_2": answers[1]}
    if reference:
        values.update({f"ref_answer_{k + 1}": text for k, text in enumerate(reference[:2])})
    template = JUDGE_PROMPTS[name]
    messages = [{"role": "system", "content": template["system_prompt"]},
                {"role": "user", "content": template["prompt_template"].format(**values)}]
    return name, messages


FASTCHAT_JUDGE_MAX_TOKENS = 2048
"""FastChat's ``chat_completion_openai(model, conv, temperature=0, max_tokens=2048)`` for GPT-4 grading."""


def chat_completion(judge: Any) -> Callable[[list[Message]], str]:
    """``complete(messages) -> reply`` over an LLM judge's ``chat``: the messages go as they are (FastChat's
    system message, then its user prompt), at the judge's temperature (0 by default, as FastChat's) with
    FastChat's 2,048 reply tokens."""
    chat = getattr(judge, "chat", None)
    if not callable(chat):
        raise ConfigError(f"judge={getattr(judge, 'name', judge)}: this judge cannot answer free-form prompts; "
                          "MT-Bench grading needs judge=llm judge.base_url=... judge.model=...")

    def complete(messages: list[Message]) -> str:
        return chat(messages, max_tokens=FASTCHAT_JUDGE_MAX_TOKENS)

    return complete


def grade_mt_bench(questions: Sequence[MtBenchQuestion], answers: Sequence[dict[str, Any]],
                   complete: Callable[[list[Message]], str], judge_model: str,
                   progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Single-answer grading of an answer file: FastChat's judgment records and mean ratings per turn.

    ``complete(messages)`` returns the judge's reply (an OpenAI-compatible chat completion). Returns
    the judgment records ``{question_id, model, judge: [judge_model, prompt name], user_prompt,
    judgment, score, turn, tstamp}`` and ``{"turn_1", "turn_2", "overall"}`` means (with stderrs
    and the count of unparsed ratings), ratings of -1 left out as FastChat's ``show_result`` does.
    """
    by_id = {a["question_id"]: a for a in answers}
    jobs = []
    for question in questions:
        if question.question_id not in by_id:
            raise KeyError(f"no answer for MT-Bench question {question.question_id}")
        turns = by_id[question.question_id]["choices"][0]["turns"]
        for turn in range(1, min(len(question.turns), len(turns), 2) + 1):
            jobs.append((question, turns, turn))
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="MT-Bench grading", unit="answer", leave=False, disable=None)
    records = []
    for question, turns, turn in jobs:
        name, messages = judge_prompt(question, turns, turn)
        judgment = complete(messages)
        records.append({"question_id": question.question_id, "model": by_id[question.question_id]["model_id"],
                        "judge": [judge_model, name], "user_prompt": messages[1]["content"],
                        "judgment": judgment, "score": parse_rating(judgment), "turn": turn,
                        "tstamp": time.time()})
    summary: dict[str, float] = {}
    for key, selected in (("turn_1", [r for r in records if r["turn"] == 1]),
                          ("turn_2", [r for r in records if r["turn"] == 2]), ("overall", records)):
        scores = [r["score"] for r in selected if r["score"] >= 0]
        summary[key], summary[f"{key}_stderr"] = mean_stderr(scores)
        summary[f"{key}_unparsed"] = sum(1 for r in selected if r["score"] < 0)
    return records, summary
