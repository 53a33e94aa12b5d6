"""The RankedExample contract and the validation every task applies while it parses.

A task turns raw records into :class:`RankedExample` objects: one prompt and its responses,
best first. Validation happens here, once, so every task reports bad input the same way: an
error that names the source, the record index and the field, or (with ``skip_invalid``) a
counted skip that is reported by reason at the end of loading.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from alignexp.errors import AlignexpError

Message = dict[str, str]
Text = Union[str, list[Message]]


@dataclass
class RankedExample:
    """One prompt and its n >= 1 responses, ranked best first; or, with ``label``, one response judged on its own.

    Attributes:
        prompt: a string, or a list of chat messages ``{"role", "content"}``.
        responses: n strings (or message lists), best first. A pair is n = 2.
        scores: optional n floats aligned with ``responses`` (non-increasing); equal scores are ties.
        target: optional reference response for SFT terms (SLiC's y_ref, TL;DR's human summary).
        meta: free-form provenance (source file, record index, ids); never used by losses.
        label: binary feedback (TRL's unpaired preference ``{prompt, completion, label}``): True where the one
            response is desirable, False where it is not; None (the default) for a ranking. An example with a
            label has exactly one response and no scores; only a loss that reads ``binary`` data (KTO) trains
            on it, and :func:`binary_feedback` turns rankings into it.
    """

    prompt: Text
    responses: list[Text]
    scores: list[float] | None = None
    target: Text | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    label: bool | None = None

    @property
    def n(self) -> int:
        return len(self.responses)


class DataError(AlignexpError, ValueError):
    """Bad input: names the source, the record index (records are numbered from 0, blank lines of a JSONL
    file not counted) and the field."""

    def __init__(self, source: str, index: int | None, field_name: str, reason: str):
        self.source, self.index, self.field_name, self.reason = source, index, field_name, reason
        where = f"{source}, record {index} (numbered from 0)" if index is not None else source
        super().__init__(f"{where}, field '{field_name}': {reason}")

    def with_skip_hint(self) -> DataError:
        """This error, its message ending with how to skip such records instead (``task.skip_invalid``), unless
        the record is of another schema (skipping every record would leave nothing)."""
        if "another task's schema" not in self.reason and "task.skip_invalid" not in self.args[0]:
            self.args = (f"{self.args[0]}\n(set task.skip_invalid=true to skip and count invalid records)",)
        return self


@dataclass
class LoadReport:
    """What loading read, produced and skipped (by reason); printed at the end of loading.

    ``skipped`` counts invalid records dropped under ``skip_invalid``; ``filtered`` counts valid records
    a task leaves out by design (e.g. CNN/DM articles among TL;DR comparisons); ``truncated`` counts
    texts over a length limit (they are cut at tokenisation time, not here).
    """

    source: str
    records: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)

    def left_out(self) -> str:
        """Why records gave no example: ``2 left out: language_pair de-en not in ... (2); 1 skipped as
        invalid: prompt: empty text (1)``, each reason with its count (empty when none was dropped)."""
        parts = []
        for what, counts in (("left out", self.filtered), ("skipped as invalid (task.skip_invalid=true)", self.skipped)):
            if counts:
                reasons = "; ".join(f"{k} ({v})" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
                parts.append(f"{sum(counts.values())} {what}: {reasons}")
        return "; ".join(parts)

    def summary(self) -> str:
        text = f"{self.source}: {self.records} records read, {self.examples} examples"
        if self.filtered:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered.items()))
            text += f", {sum(self.filtered.values())} left out by design ({reasons})"
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values())} skipped ({reasons})"
        if self.truncated:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.truncated.items()))
            text += f", truncated ({reasons})"
        return text


@dataclass(frozen=True)
class LeftOut:
    """What a parser returns for a valid record that a setting leaves out; ``reason`` names the setting
    (``language_pair de-en not in task.language_pairs=[cs-en]``). Counted in ``LoadReport.filtered``."""

    reason: str


class SampledText(str):
    """A response drawn from a policy: its text, and the tokens that were sampled (``token_ids``, EOS last
    only where the generation ``finished``; a generation cut at the token limit has none).

    Training encodes it from ``token_ids``, not from its text: no EOS is added to a cut generation, and
    a BPE tokenizer cannot turn the decoded text into other tokens than those sampled. It moves with its
    response through ranking, pairing and truncation, as any string does.
    """

    token_ids: tuple[int, ...]
    finished: bool

    def __new__(cls, text: str, token_ids: Sequence[int], finished: bool) -> SampledText:
        obj = super().__new__(cls, text)
        obj.token_ids, obj.finished = tuple(int(t) for t in token_ids), bool(finished)
        return obj

    def __getnewargs__(self) -> tuple:  # pickling and copying keep the tokens
        return str(self), self.token_ids, self.finished


def _is_empty(text: Any) -> bool:
    if isinstance(text, str):
        return not text.strip()
    if isinstance(text, list):
        return not text or all(not str(m.get("content", "")).strip() for m in text if isinstance(m, dict))
    return True


def _check_text(value: Any, source: str, index: int | None, field_name: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(source, index, field_name, "empty text")
        return
    if isinstance(value, list):
        if not value:
            raise DataError(source, index, field_name, "empty message list")
        for j, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise DataError(source, index, f"{field_name}[{j}]",
                                "expected a message {'role': str, 'content': str}")
        if _is_empty(value):
            raise DataError(source, index, field_name, "all messages are empty")
        return
    raise DataError(source, index, field_name,
                    f"expected a string or a list of messages, got {type(value).__name__}")


def validate_example(example: RankedExample, source: str, index: int | None,
                     min_responses: int = 1) -> RankedExample:
    """Check ``example`` against the RankedExample contract; raise :class:`DataError` naming the field."""
    _check_text(example.prompt, source, index, "prompt")
    if not isinstance(example.responses, list):
        raise DataError(source, index, "responses", "expected a list")
    if example.label is not None:  # binary feedback: one response, desirable or not
        if not isinstance(example.label, bool):
            raise DataError(source, index, "label", f"expected true or false, got {example.label!r}")
        if len(example.responses) != 1 or example.scores is not None:
            raise DataError(source, index, "label", "binary feedback has one response and no scores")
    elif len(example.responses) < min_responses:
        raise DataError(source, index, "responses",
                        f"{len(example.responses)} responses, the loss needs at least {min_responses}")
    for j, response in enumerate(example.responses):
        _check_text(response, source, index, f"responses[{j}]")
    if example.target is not None:
        _check_text(example.target, source, index, "target")
    if example.scores is not None:
        if len(example.scores) != len(example.responses):
            raise DataError(source, index, "scores",
                            f"{len(example.scores)} scores for {len(example.responses)} responses")
        for j, score in enumerate(example.scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise DataError(source, index, f"scores[{j}]", f"expected a number, got {score!r}")
            if math.isnan(score) or math.isinf(score):
                raise DataError(source, index, f"scores[{j}]", f"score is {score}")
        if any(a < b for a, b in zip(example.scores, example.scores[1:])):
            raise DataError(source, index, "scores", "responses are not ranked best first (scores increase)")
    return example


def sort_by_scores(responses: Sequence[Text], scores: Sequence[float]) -> tuple[list[Text], list[float]]:
    """Order responses best first by score; the sort is stable, so ties keep their given order."""
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    return [responses[i] for i in order], [float(scores[i]) for i in order]


class Validator:
    """Validates examples one by one: raises on the first bad one, or counts skips by reason.

    Usage::

        validator = Validator(source, skip_invalid, min_responses)
        examples = list(validator.run(records, parse))
        print(validator.report.summary())
    """

    def __init__(self, source: str, skip_invalid: bool = False, min_responses: int = 1):
        self.report = LoadReport(source)
        self.skip_invalid = skip_invalid
        self.min_responses = min_responses

    def run(self, records: Iterable[Any], parse) -> Iterator[RankedExample]:
        """Parse each record with ``parse(record, index) -> RankedExample | list[RankedExample] | LeftOut``."""
        for index, record in enumerate(records):
            self.report.records += 1
            try:
                parsed = parse(record, index)
                if isinstance(parsed, LeftOut):
                    self.report.filtered[parsed.reason] += 1
                    continue
                examples = parsed if isinstance(parsed, list) else [parsed]
                for example in examples:
                    validate_example(example, self.report.source, index, self.min_responses)
            except DataError as error:
                if not self.skip_invalid:
                    raise error.with_skip_hint() from None
                self.report.skipped[f"{error.field_name.split('[')[0]}: {error.reason}"] += 1
                continue
            self.report.examples += len(examples)
            yield from examples


def check_ranking_length(ranking_length: int | None) -> None:
    """``task.ranking_length``: null (keep every response) or an integer >= 2 (a ranking is at least a pair)."""
    if ranking_length is not None and (isinstance(ranking_length, bool) or not isinstance(ranking_length, int)
                                       or ranking_length < 2):
        from alignexp.errors import ConfigError

        raise ConfigError(f"task.ranking_length must be an integer >= 2 (or null), got {ranking_length!r}")


class Task:
    """What every task is (``conf/task/<name>.yaml`` names its class with ``_target_``).

    Declared by each task class: ``has_gold_reward`` (a programmatic r*(x, y) in :meth:`gold_reward`),
    ``trains_sft_policy`` (the task trains and caches its own SFT policy, keyed by :meth:`sft_key`,
    when no weights are given), ``offline_preferences`` (it has preference data of its own, so no
    sampler is needed) and ``samples_preferences`` (its rankings are responses sampled from the
    reference policy and labelled by the task: :meth:`preference_examples` takes a ``sample_fn``). Data for each stage: :meth:`sft_examples` (demonstrations),
    :meth:`preference_examples` (rankings, n >= 2, best first), :meth:`eval_examples` (held-out prompts
    with a reference response as ``responses[0]`` where the task has one) and :meth:`prompts`.
    """

    name: str = "task"
    has_gold_reward: bool = False
    trains_sft_policy: bool = False
    offline_preferences: bool = True
    samples_preferences: bool = False
    # The task's SFT policy is fine-tuned from the pretrained backbone (model.path) rather than built from
    # model.arch: a task on real text (imdb) fine-tunes a real model; model.path then names the backbone.
    sft_from_backbone: bool = False
    ranking_length: int | None = None
    eval_split: str | None = None
    last_report: LoadReport | None = None

    def sft_examples(self, split: str = "train") -> list[RankedExample]:
        raise NotImplementedError(f"task '{self.name}' has no SFT data")

    def preference_examples(self, split: str = "train", sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        raise NotImplementedError(f"task '{self.name}' has no preference data")

    def eval_examples(self) -> list[RankedExample]:
        raise NotImplementedError(f"task '{self.name}' has no evaluation data")

    def setup_warnings(self) -> list[str]:
        """What the task's settings make likely to be a mistake (evaluating on the training data), each with the
        key that fixes it; a training run logs them as warnings after its preflight."""
        return []

    def gold_reward(self, prompt: Text, response: Text) -> float:
        raise NotImplementedError(f"task '{self.name}' has no gold reward")

    def gold_rewards(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        """r*(x, y) for many pairs at once; a task whose gold reward is a model scores them in batches."""
        return [float(self.gold_reward(p, r)) for p, r in zip(prompts, responses)]

    def sft_key(self) -> dict[str, Any]:
        """The settings the task's SFT data depends on (the SFT policy's cache key)."""
        raise NotImplementedError(f"task '{self.name}' trains no SFT policy of its own")

    def prompts(self, split: str = "train") -> list[Text]:
        """The distinct prompts of ``split`` in order: the held-out prompts (``eval``) or the SFT data's."""
        import json

        examples = self.eval_examples() if split == "eval" else self.sft_examples(split)
        seen: set[str] = set()
        prompts = []
        for ex in examples:
            key = json.dumps(ex.prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(ex.prompt)
        return prompts


def truncate_rankings(examples: list[RankedExample], ranking_length: int | None) -> list[RankedExample]:
    """Keep ``ranking_length`` responses of each ranking: the best, the worst and evenly spaced between.

    With k kept out of n, positions round(i * (n - 1) / (k - 1)) for i = 0..k-1 are kept, so k = 2
    keeps (best, worst) and k >= n keeps everything. Scores follow their responses.
    """
    if ranking_length is None:
        return examples
    out = []
    for ex in examples:
        n = ex.n
        if ranking_length >= n:
            out.append(ex)
            continue
        if ranking_length == 1:
            keep = [0]
        else:
            keep = sorted({round(i * (n - 1) / (ranking_length - 1)) for i in range(ranking_length)})
        out.append(RankedExample(
            prompt=ex.prompt,
            responses=[ex.responses[i] for i in keep],
            scores=None if ex.scores is None else [ex.scores[i] for i in keep],
            target=ex.target, meta=dict(ex.meta)))
    return out


def binary_feedback(examples: list[RankedExample], rule: str | float = "best") -> list[RankedExample]:
    """Binary feedback (one response each, ``label`` set) from rankings, for a loss that reads ``binary`` data.

    ``rule``: ``"best"``: the best response of each ranking is desirable and the rest are not (responses whose
    score ties the best's are desirable too); a number: a response whose score is at least it is desirable,
    which needs scores (a ranking without them is an error naming its record). Examples that already carry
    a label pass through. Each keeps the ranking's ``meta`` with ``meta["rank"]``, its position there.
    """
    out = []
    for position, ex in enumerate(examples):
        if ex.label is not None:
            out.append(ex)
            continue
        if rule == "best":
            labels = [k == 0 or (ex.scores is not None and ex.scores[k] == ex.scores[0]) for k in range(ex.n)]
        else:
            if ex.scores is None:
                meta = ex.meta or {}
                raise DataError(str(meta.get("source", "rankings")), meta.get("index", position), "scores",
                                f"binary={rule}: labelling by a score threshold needs scores, and this ranking "
                                "has none (use binary=best)")
            labels = [score >= float(rule) for score in ex.scores]
        for k, (response, label) in enumerate(zip(ex.responses, labels)):
            out.append(RankedExample(ex.prompt, [response], None, ex.target, {**ex.meta, "rank": k}, label=label))
    return out


def with_mismatched_responses(examples: list[RankedExample], rng) -> list[RankedExample]:
    """Each binary-feedback example with a second response: that of another example whose prompt differs (KTO's
    mismatched pair for its KL reference point, :func:`alignexp.losses.kto.kto_loss`). The examples are put in
    an order drawn from ``rng``, and each takes the response of the nearest example before it (cyclically)
    with another prompt, as TRL's collator cycles a batch's completions by one. Scores become
    ``[label, label]`` (1.0 desirable, 0.0 not): the loss reads the label from them.
    """
    import json

    keys = [json.dumps(ex.prompt, sort_keys=True) for ex in examples]
    if len(set(keys)) < 2:
        raise DataError("binary feedback", None, "prompt",
                        f"KTO's KL reference point pairs each prompt with another prompt's response, and the "
                        f"{len(examples)} examples have {len(set(keys))} distinct prompt(s): give at least two")
    order = list(range(len(examples)))
    rng.shuffle(order)
    out: list[RankedExample | None] = [None] * len(examples)
    for position, i in enumerate(order):
        step = 1
        while keys[order[(position - step) % len(order)]] == keys[i]:
            step += 1
        j = order[(position - step) % len(order)]
        ex, label = examples[i], 1.0 if examples[i].label else 0.0
        out[i] = RankedExample(ex.prompt, [ex.responses[0], examples[j].responses[0]], [label, label], ex.target,
                               {**ex.meta, "mismatched_response_of": j})
    return out


# -- reading fields of raw records --------------------------------------------------------------
# Parsers use these so that every error names the record's own field ("summaries[1].text"), not the
# RankedExample field it becomes.

ROLES = frozenset({"system", "user", "assistant", "tool"})
_MISSING = object()


def get_field(record: Any, key: str, source: str, index: int | None, field_name: str | None = None,
              *, optional: bool = False) -> Any:
    """``record[key]``; a missing key (or None, unless ``optional``) is a :class:`DataError`."""
    name = field_name or key
    if not isinstance(record, dict):
        raise DataError(source, index, name.rsplit(".", 1)[0] if "." in name else "<record>",
                        f"expected an object, got {type(record).__name__}")
    value = record.get(key, _MISSING)
    if value is _MISSING:
        if optional:
            return None
        raise DataError(source, index, name, "missing field")
    if value is None and not optional:
        raise DataError(source, index, name, "is null")
    return value


def text_field(record: Any, key: str, source: str, index: int | None, field_name: str | None = None,
               *, optional: bool = False) -> str | None:
    """A non-empty string field (None only where ``optional`` and the field is absent or null)."""
    name = field_name or key
    value = get_field(record, key, source, index, name, optional=optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(source, index, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(source, index, name, "empty text")
    return value


def number_value(value: Any, source: str, index: int | None, field_name: str) -> float:
    """A finite number (strings such as ``"4"`` are parsed; ``"N/A"``, NaN and booleans are errors)."""
    if isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            raise DataError(source, index, field_name, f"not a number: {value!r}") from None
        value = parsed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(source, index, field_name,
                        f"expected a number, got {'null' if value is None else type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise DataError(source, index, field_name, f"score is {value}")
    return float(value)


def messages_value(value: Any, source: str, index: int | None, field_name: str,
                   *, allow_empty_content: bool = False) -> list[Message]:
    """A non-empty list of chat messages ``{"role", "content"}`` with known roles."""
    if not isinstance(value, list):
        raise DataError(source, index, field_name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(source, index, field_name, "empty message list")
    messages = []
    for j, message in enumerate(value):
        where = f"{field_name}[{j}]"
        if not isinstance(message, dict):
            raise DataError(source, index, where, f"expected a message object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(source, index, f"{where}.role", f"unknown role {role!r} (expected one of "
                            f"{', '.join(sorted(ROLES))})")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(source, index, f"{where}.content",
                            f"expected a string, got {'null' if content is None else type(content).__name__}")
        if not allow_empty_content and not content.strip():
            raise DataError(source, index, f"{where}.content", "empty text")
        messages.append({"role": role, "content": content})
    return messages


def assistant_turn_examples(messages: list[Message], source: str, index: int, field_name: str = "messages",
                            meta: dict[str, Any] | None = None) -> list[RankedExample]:
    """One SFT example per assistant turn: the messages before it as the prompt, its content as the response.

    Summing the log-probs of these responses sums exactly the conversation's assistant tokens, so
    multi-turn SFT trains on assistant turns only.
    """
    examples = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(source, index, f"{field_name}[0]", "the conversation starts with an assistant turn")
        if not message["content"].strip():
            raise DataError(source, index, f"{field_name}[{i}].content", "empty text")
        examples.append(RankedExample(prompt=messages[:i], responses=[message["content"]],
                                      meta={**(meta or {}), "source": source, "index": index, "turn": i}))
    if not examples:
        raise DataError(source, index, field_name, "no assistant turn")
    return examples


def has_ties(scores: Sequence[float] | None) -> int:
    """How many adjacent pairs of a best-first ranking have equal scores."""
    if not scores:
        return 0
    return sum(a == b for a, b in zip(scores, scores[1:]))
