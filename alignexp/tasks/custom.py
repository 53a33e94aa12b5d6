"""Your own data, in TRL's dataset formats, from ``task.path`` (JSONL, JSON, Parquet or save_to_disk).

Formats (``task.format``; ``auto`` detects each file's format from its first record's fields):

* ``preference``: ``{prompt, chosen, rejected}``, strings ("standard") or message lists
  ("conversational"). The prompt may be implicit (no ``prompt`` field): it is then the longest common
  message prefix of ``chosen`` and ``rejected`` (conversational), or their longest common string
  prefix, moved back to before a space where the texts part just after one (as TRL's
  ``extract_prompt`` does) (standard).
* ``listwise``: ``{prompt, responses, scores}``, responses in any order; they are sorted best first by
  score (equal scores are ties and keep their order). Without ``scores``, ``{prompt, responses}`` is a
  ranking given best first (a loss that reads scores refuses it, naming the record).
* ``sft``: ``{prompt, completion}`` (strings or message lists) or ``{messages}`` (one example per
  assistant turn, so that only assistant tokens are trained on).
* ``binary``: ``{prompt, completion, label}``, TRL's unpaired preference format: one completion judged
  desirable (``label: true``) or not (``false``). Only a loss that reads binary feedback (``loss=kto``)
  trains on it; its desirable completions are the SFT demonstrations and the evaluation references.

A response given as a message list is reduced to its text where it is one assistant message.
``sft_examples`` on preference data uses the best response; ``preference_examples`` needs preference
or listwise data. Evaluation reads ``eval_path`` (default: ``path``) at ``eval_split``, with the best
response as the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignexp.tasks.base import (
    DataError,
    LeftOut,
    RankedExample,
    Text,
    assistant_turn_examples,
    get_field,
    messages_value,
    number_value,
    sort_by_scores,
)
from alignexp.tasks.loading import DataUnavailable, RecordTask, record_sources

FORMATS = ("auto", "preference", "listwise", "sft", "binary")


def detect_format(record: Any, source: str, index: int) -> str:
    if isinstance(record, dict):
        if "chosen" in record or "rejected" in record:
            return "preference"
        if "responses" in record or "scores" in record:
            return "listwise"
        if "label" in record:
            return "binary"
        if "completion" in record or "messages" in record:
            return "sft"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(source, index, "<record>", "cannot tell the format: expected chosen/rejected (preference), "
                    f"responses/scores (listwise), completion/label (binary) or completion/messages (sft); found "
                    f"{keys}. Set task.format")


class CustomTask(RecordTask):
    """See the module docstring."""

    def __init__(self, name: str = "custom", path: str | None = None, format: str = "auto", split: str = "train",
                 eval_path: str | None = None, eval_split: str = "test", **common: Any):
        if format not in FORMATS:
            raise ValueError(f"task.format must be one of {', '.join(FORMATS)}, got {format!r}")
        super().__init__(name, path, split, **common)
        self.format, self.eval_path, self.eval_split = format, eval_path, eval_split

    def _examples(self, path: str | None, split: str, stage: str, path_key: str = "task.path") -> list[RankedExample]:
        if not path:
            raise DataUnavailable(f"task={self.name} reads your own files: set {path_key}=FILE_OR_FOLDER "
                                  "(JSONL, JSON, Parquet, or a save_to_disk folder)")
        detected: dict[str, str] = {}

        def parse(record: Any, index: int, source: str):
            if self.format == "auto" and source not in detected:
                detected[source] = detect_format(record, source, index)
            fmt = self.format if self.format != "auto" else detected[source]
            if stage == "preference" and fmt == "sft":
                raise DataError(source, index, "<record>", "SFT data (prompt/completion or messages) has no "
                                "preferences: give chosen/rejected or responses/scores")
            if fmt == "sft":
                return parse_sft(record, index, source)
            if fmt == "binary":
                example = parse_binary(record, index, source)
                if stage == "preference":
                    return example
                if not example.label:  # an undesirable completion is neither a demonstration nor a reference
                    return LeftOut("binary feedback labelled undesirable (not a demonstration)")
                return RankedExample(example.prompt, example.responses, meta=example.meta)
            example = parse_preference(record, index, source) if fmt == "preference" else \
                parse_listwise(record, index, source)
            if stage != "preference":
                return RankedExample(example.prompt, example.responses[:1], meta=example.meta)
            return example

        sources = record_sources(path, split, hub_id=None, path_key=path_key)
        return self.load(sources, parse, min_responses=2 if stage == "preference" else 1, what=stage)

    def preference_examples(self, split: str | None = None, sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """Pairs or rankings from preference/listwise data; ``sample_fn``/``n_responses`` are not used."""
        return self.rankings(self._examples(self.path, self.resolve_split(split, self.split), "preference"))

    def sft_examples(self, split: str | None = None) -> list[RankedExample]:
        return self._examples(self.path, self.resolve_split(split, self.split), "sft")

    def setup_warnings(self) -> list[str]:
        """A single file read with no ``eval_path``: evaluation reads the training records themselves."""
        if self.eval_path is None and self.path and Path(self.path).expanduser().is_file():
            return [f"task.eval_path=null: evaluation reads task.path={self.path}, the training data itself, so its "
                    "figures are on data the policy was trained on. Set task.eval_path=<held-out records>"]
        return []

    def eval_examples(self) -> list[RankedExample]:
        path_key = "task.eval_path" if self.eval_path else "task.path"
        examples = self._examples(self.eval_path or self.path, self.eval_split, "eval", path_key)
        for example in examples:
            example.target = example.responses[0]
        return self.eval_subset(examples)


# -- parsing ----------------------------------------------------------------------------------------

def _text_or_messages(value: Any, source: str, index: int, field: str) -> Text:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, index, field, "empty text")
        return value
    if isinstance(value, list):
        return messages_value(value, source, index, field)
    raise DataError(source, index, field, "expected a string or a list of messages, got "
                    f"{'null' if value is None else type(value).__name__}")


def _as_response(value: Text) -> Text:
    """A one-message assistant reply as its text; other message lists as they are."""
    if isinstance(value, list) and len(value) == 1 and value[0]["role"] == "assistant":
        return value[0]["content"]
    return value


def common_string_prefix(a: str, b: str) -> int:
    """Length of the implicit prompt of two strings (TRL's ``extract_prompt``: back off before a space)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if n < min(len(a), len(b)) and n > 0 and a[n - 1] == " ":
        n -= 1
    return n


def common_message_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def parse_preference(record: Any, index: int, source: str) -> RankedExample:
    """``{prompt?, chosen, rejected}``; an absent prompt is the common prefix of chosen and rejected."""
    chosen = _text_or_messages(get_field(record, "chosen", source, index), source, index, "chosen")
    rejected = _text_or_messages(get_field(record, "rejected", source, index), source, index, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(source, index, "rejected", "chosen and rejected must both be strings or both message lists")
    prompt_value = get_field(record, "prompt", source, index, optional=True)
    if prompt_value is not None:
        prompt = _text_or_messages(prompt_value, source, index, "prompt")
    else:
        if isinstance(chosen, str):
            cut = common_string_prefix(chosen, rejected)
        else:
            cut = common_message_prefix(chosen, rejected)
        if cut == 0:
            raise DataError(source, index, "prompt", "no prompt field, and chosen and rejected share no prefix "
                            "to take as the implicit prompt")
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value or (isinstance(value, str) and not value.strip()):
                raise DataError(source, index, key, "nothing left after the implicit prompt (the shared prefix)")
    return RankedExample(prompt, [_as_response(chosen), _as_response(rejected)],
                         meta={"source": source, "index": index})


def parse_listwise(record: Any, index: int, source: str) -> RankedExample:
    """``{prompt, responses, scores}``, sorted best first by score; ``{prompt, responses}`` without scores is
    a ranking already best first (no ties), kept in its order."""
    prompt = _text_or_messages(get_field(record, "prompt", source, index), source, index, "prompt")
    responses = get_field(record, "responses", source, index)
    if not isinstance(responses, list):
        raise DataError(source, index, "responses", f"expected a list, got {type(responses).__name__}")
    responses = [_as_response(_text_or_messages(r, source, index, f"responses[{j}]"))
                 for j, r in enumerate(responses)]
    if isinstance(record, dict) and "scores" not in record:
        return RankedExample(prompt, responses, meta={"source": source, "index": index})
    scores = get_field(record, "scores", source, index)
    if not isinstance(scores, list):
        raise DataError(source, index, "scores", f"expected a list, got {type(scores).__name__}")
    if len(scores) != len(responses):
        raise DataError(source, index, "scores", f"{len(scores)} scores for {len(responses)} responses")
    scores = [number_value(s, source, index, f"scores[{j}]") for j, s in enumerate(scores)]
    responses, scores = sort_by_scores(responses, scores)
    return RankedExample(prompt, responses, scores=scores, meta={"source": source, "index": index})


def parse_sft(record: Any, index: int, source: str) -> RankedExample | list[RankedExample]:
    """``{prompt, completion}`` or ``{messages}`` (one example per assistant turn)."""
    if isinstance(record, dict) and "messages" in record and "completion" not in record:
        messages = messages_value(record["messages"], source, index, "messages")
        return assistant_turn_examples(messages, source, index)
    prompt = _text_or_messages(get_field(record, "prompt", source, index), source, index, "prompt")
    completion = _text_or_messages(get_field(record, "completion", source, index), source, index, "completion")
    return RankedExample(prompt, [_as_response(completion)], meta={"source": source, "index": index})


def parse_binary(record: Any, index: int, source: str) -> RankedExample:
    """``{prompt, completion, label}`` (TRL's unpaired preference format): binary feedback on one completion."""
    prompt = _text_or_messages(get_field(record, "prompt", source, index), source, index, "prompt")
    completion = _text_or_messages(get_field(record, "completion", source, index), source, index, "completion")
    label = get_field(record, "label", source, index)
    if not isinstance(label, bool):
        raise DataError(source, index, "label", f"expected true (desirable) or false (undesirable), got {label!r}")
    return RankedExample(prompt, [_as_response(completion)], meta={"source": source, "index": index}, label=label)
