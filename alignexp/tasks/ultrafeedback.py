"""UltraFeedback: GPT-4-rated responses to 64k prompts, as pairs or as 4-way rankings.

Two record formats, chosen with ``task.format`` (``auto`` detects it from the first record's fields):

* ``binarized`` (``HuggingFaceH4/ultrafeedback_binarized``; splits ``train_prefs``, ``test_prefs``,
  ``train_sft``, ``test_sft``, ``train_gen``, ``test_gen``): ``prompt``, ``chosen`` / ``rejected``
  (message lists that repeat the prompt and end with the assistant's answer), ``score_chosen``,
  ``score_rejected``. Each record becomes a pair: the prompt as ``[{"role": "user", ...}]``, the
  final assistant contents as responses, the two scores (equal scores are a tie).
* ``raw`` (``openbmb/UltraFeedback``, split ``train``): ``instruction`` and ``completions[4]{model,
  response, annotations{aspect: {Rating, Rationale, ...}}, overall_score, fine-grained_score, ...}``.
  Each record becomes one ranking of its completions by ``task.rank_by``: ``overall_score``,
  ``fine_grained_score``, or an aspect (``helpfulness``, ``honesty``, ``instruction_following``,
  ``truthfulness``), whose ``Rating`` strings ("4") are parsed; "N/A" is a bad value. Equal scores
  stay ties, in the dataset's order.

SFT uses the binarized ``messages`` where present (one example per assistant turn), else the best
response; evaluation uses the held-out split with the best response as ``responses[0]``.
"""

from __future__ import annotations

from typing import Any

from alignexp.tasks.base import (
    DataError,
    RankedExample,
    assistant_turn_examples,
    get_field,
    messages_value,
    number_value,
    sort_by_scores,
    text_field,
)
from alignexp.tasks.loading import RecordTask, record_sources

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
RANK_BY = ("overall_score", "fine_grained_score", *ASPECTS)
FORMATS = ("auto", "binarized", "raw")
DEFAULT_SPLITS = {  # (preferences, sft, eval) per format, where the config leaves them null
    "binarized": ("train_prefs", "train_sft", "test_prefs"),
    "raw": ("train", "train", None),
}
ALIASES = {"binarized": {"train": ("train_prefs", "train_sft"), "test": ("test_prefs", "test_sft")}}


class UltraFeedbackTask(RecordTask):
    """See the module docstring."""

    def __init__(self, name: str = "ultrafeedback", path: str | None = None, format: str = "auto",
                 rank_by: str = "overall_score",
                 hub_id: str | None = "HuggingFaceH4/ultrafeedback_binarized",
                 raw_hub_id: str | None = "openbmb/UltraFeedback",
                 split: str | None = None, sft_split: str | None = None, eval_split: str | None = None,
                 **common: Any):
        if format not in FORMATS:
            raise ValueError(f"task.format must be one of {', '.join(FORMATS)}, got {format!r}")
        if rank_by not in RANK_BY:
            raise ValueError(f"task.rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
        super().__init__(name, path, split, **common)
        self.format, self.rank_by = format, rank_by
        self.hub_id, self.raw_hub_id = hub_id, raw_hub_id
        self.sft_split, self.eval_split = sft_split, eval_split

    # -- where the records come from ---------------------------------------------------------------
    @property
    def _hub_format(self) -> str:
        return "raw" if self.format == "raw" else "binarized"

    def _split(self, split: str | None, stage: int) -> str | None:
        configured = (self.split, self.sft_split, self.eval_split)[stage]
        split = self.resolve_split(split, configured or DEFAULT_SPLITS[self._hub_format][stage])
        alias = ALIASES.get(self._hub_format, {}).get(split)
        return alias[1 if stage == 1 else 0] if alias and not self.path else split

    def _sources(self, split: str | None):
        hub_id = self.raw_hub_id if self._hub_format == "raw" else self.hub_id
        if split is None:
            raise ValueError(f"task={self.name} format={self._hub_format} has no held-out split by default: "
                             "set task.eval_split (and task.path to a local copy holding it)")
        return record_sources(self.path, split, hub_id=hub_id)

    def _parser(self, stage: str):
        forced = self.format
        detected: dict[str, str] = {}

        def parse(record: Any, index: int, source: str):
            if forced == "auto" and source not in detected:
                detected[source] = detect_format(record, source, index)
            fmt = forced if forced != "auto" else detected[source]
            if fmt == "raw":
                example = parse_raw(record, index, source, self.rank_by)
            elif stage == "sft" and isinstance(record, dict) and record.get("messages"):
                messages = messages_value(record["messages"], source, index, "messages")
                return assistant_turn_examples(messages, source, index, meta={"prompt_id": record.get("prompt_id")})
            else:
                example = parse_binarized(record, index, source)
            if stage == "preference":
                return example
            return RankedExample(example.prompt, example.responses[:1], meta=example.meta)  # the best response

        return parse

    # -- the three stages -----------------------------------------------------------------------------
    def preference_examples(self, split: str | None = None, sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """Pairs (binarized) or rankings by ``rank_by`` (raw); ``sample_fn``/``n_responses`` are not used."""
        examples = self.load(self._sources(self._split(split, 0)), self._parser("preference"),
                             min_responses=2, what="preferences")
        return self.rankings(examples)

    def sft_examples(self, split: str | None = None) -> list[RankedExample]:
        return self.load(self._sources(self._split(split, 1)), self._parser("sft"), what="sft")

    def eval_examples(self) -> list[RankedExample]:
        examples = self.load(self._sources(self._split(None, 2)), self._parser("eval"), what="eval")
        for example in examples:
            example.target = example.responses[0]
        return self.eval_subset(examples)


def detect_format(record: Any, source: str, index: int) -> str:
    if isinstance(record, dict):
        if "completions" in record and "instruction" in record:
            return "raw"
        if "chosen" in record or "rejected" in record:
            return "binarized"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(source, index, "<record>", "cannot tell the format: expected 'prompt'/'chosen'/'rejected' "
                    f"(binarized) or 'instruction'/'completions' (raw), found {keys}; set task.format")


def _final_assistant(record: dict, key: str, source: str, index: int) -> str:
    messages = messages_value(get_field(record, key, source, index), source, index, key,
                              allow_empty_content=True)
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(source, index, f"{key}[{len(messages) - 1}].role",
                        f"the last message should be the assistant's answer, got role {last['role']!r}")
    if not last["content"].strip():
        raise DataError(source, index, f"{key}[{len(messages) - 1}].content", "empty text")
    return last["content"]


def parse_binarized(record: Any, index: int, source: str) -> RankedExample:
    """A binarized pair: ``[user prompt]``, (chosen, rejected) answers, their scores."""
    prompt = text_field(record, "prompt", source, index)
    chosen = _final_assistant(record, "chosen", source, index)
    rejected = _final_assistant(record, "rejected", source, index)
    scores = [number_value(get_field(record, key, source, index), source, index, key)
              for key in ("score_chosen", "score_rejected")]
    if scores[0] < scores[1]:
        raise DataError(source, index, "score_chosen",
                        f"the chosen response scores lower than the rejected one ({scores[0]} < {scores[1]})")
    return RankedExample([{"role": "user", "content": prompt}], [chosen, rejected], scores=scores,
                         meta={"source": source, "index": index, "prompt_id": record.get("prompt_id")})


def completion_score(completion: Any, rank_by: str, source: str, index: int, field: str) -> float:
    """The score of one raw completion under ``rank_by``."""
    if rank_by in ASPECTS:
        annotations = get_field(completion, "annotations", source, index, f"{field}.annotations")
        aspect = get_field(annotations, rank_by, source, index, f"{field}.annotations.{rank_by}")
        rating = get_field(aspect, "Rating", source, index, f"{field}.annotations.{rank_by}.Rating")
        where = f"{field}.annotations.{rank_by}.Rating"
        if isinstance(rating, str) and rating.strip().upper() == "N/A":
            raise DataError(source, index, where, "rating is N/A")
        return number_value(rating, source, index, where)
    key = "fine-grained_score" if rank_by == "fine_grained_score" else rank_by
    return number_value(get_field(completion, key, source, index, f"{field}.{key}"), source, index,
                        f"{field}.{key}")


def parse_raw(record: Any, index: int, source: str, rank_by: str) -> RankedExample:
    """A raw record: the completions ranked best first by ``rank_by`` (ties keep the dataset's order)."""
    instruction = text_field(record, "instruction", source, index)
    completions = get_field(record, "completions", source, index)
    if not isinstance(completions, list):
        raise DataError(source, index, "completions", f"expected a list, got {type(completions).__name__}")
    responses, scores, models = [], [], []
    for j, completion in enumerate(completions):
        responses.append(text_field(completion, "response", source, index, f"completions[{j}].response"))
        scores.append(completion_score(completion, rank_by, source, index, f"completions[{j}]"))
        models.append(completion.get("model"))
    ranked, scores = sort_by_scores(list(zip(responses, models)), scores)
    return RankedExample([{"role": "user", "content": instruction}], [r for r, _ in ranked], scores=scores,
                         meta={"source": source, "index": index, "models": [m for _, m in ranked],
                               "rank_by": rank_by, "source_dataset": record.get("source")})
