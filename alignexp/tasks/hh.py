"""Anthropic HH-RLHF (``Anthropic/hh-rlhf``): helpful/harmless dialogue preferences.

Records: ``chosen`` and ``rejected``, each a full transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
with an implicit prompt (the dialogue they share). The prompt ends at the last ``"\\n\\nAssistant:"``
inside the transcripts' common prefix; what follows it in each transcript is that response (its
leading space removed; kept as one space with ``chat_format: text``). With ``chat_format: messages`` (the default) the prompt becomes a chat
message list (``Human`` -> ``user``, ``Assistant`` -> ``assistant``), for multi-turn dialogue
through the tokenizer's chat template; ``chat_format: text`` keeps the raw transcript as the prompt
(as the DPO paper did). Splits: ``train``, ``test``.

SFT uses the chosen responses (prompt + chosen); evaluation the held-out split, chosen as reference.
"""

from __future__ import annotations

import re
from typing import Any

from alignexp.tasks.base import DataError, Message, RankedExample, Text, text_field
from alignexp.tasks.loading import RecordTask, record_sources

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
CHAT_FORMATS = ("messages", "text")


class HhTask(RecordTask):
    """See the module docstring."""

    def __init__(self, name: str = "hh", path: str | None = None, hub_id: str | None = "Anthropic/hh-rlhf",
                 hub_kwargs: dict[str, Any] | None = None, split: str = "train", sft_split: str = "train",
                 eval_split: str = "test", chat_format: str = "messages", **common: Any):
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"task.chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
        super().__init__(name, path, split, **common)
        self.hub_id, self.hub_kwargs = hub_id, dict(hub_kwargs or {})
        self.sft_split, self.eval_split, self.chat_format = sft_split, eval_split, chat_format

    def _pairs(self, split: str, what: str, keep: int) -> list[RankedExample]:
        sources = record_sources(self.path, split, hub_id=self.hub_id, hub_kwargs=self.hub_kwargs)

        def parse(record: Any, index: int, source: str) -> RankedExample:
            example = parse_pair(record, index, source, self.chat_format)
            example.responses = example.responses[:keep]
            return example

        return self.load(sources, parse, min_responses=keep, what=what)

    def preference_examples(self, split: str | None = None, sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """(chosen, rejected) pairs; ``sample_fn``/``n_responses`` are not used."""
        return self.rankings(self._pairs(self.resolve_split(split, self.split), "preferences", keep=2))

    def sft_examples(self, split: str | None = None) -> list[RankedExample]:
        return self._pairs(self.resolve_split(split, self.sft_split), "sft", keep=1)

    def eval_examples(self) -> list[RankedExample]:
        examples = self._pairs(self.eval_split, "eval", keep=1)
        for example in examples:
            example.target = example.responses[0]
        return self.eval_subset(examples)


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response), the prompt ending with ``"\\n\\nAssistant:"``.

    The split point is the last ``"\\n\\nAssistant:"`` that lies wholly inside the common prefix;
    None where there is none.
    """
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def transcript_to_messages(transcript: str) -> list[Message] | None:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` -> user/assistant/user messages.

    The final empty ``Assistant:`` (where the response goes) is dropped. None if the transcript does not
    start with a Human turn.
    """
    parts = _TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        return None
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def parse_pair(record: Any, index: int, source: str, chat_format: str = "messages") -> RankedExample:
    chosen = text_field(record, "chosen", source, index)
    rejected = text_field(record, "rejected", source, index)
    split = split_transcripts(chosen, rejected)
    if split is None:
        raise DataError(source, index, "chosen", f"no '{ASSISTANT.strip()}' turn in the dialogue that chosen and "
                        "rejected share, so there is no prompt")
    prompt_text, chosen_response, rejected_response = split
    for key, response in (("chosen", chosen_response), ("rejected", rejected_response)):
        if not response:
            raise DataError(source, index, key, "empty response after the last 'Assistant:'")
    prompt: Text = prompt_text
    if chat_format == "messages":
        messages = transcript_to_messages(prompt_text)
        if messages is None:
            raise DataError(source, index, "chosen", f"the dialogue does not start with '{HUMAN.strip()}'")
        empty = [i for i, m in enumerate(messages) if not m["content"]]
        if empty:
            raise DataError(source, index, "chosen", f"empty turn {empty[0]} in the dialogue")
        prompt = messages
    else:  # the raw transcript ends with "Assistant:"; the response follows after one space
        chosen_response, rejected_response = " " + chosen_response, " " + rejected_response
    return RankedExample(prompt, [chosen_response, rejected_response], meta={"source": source, "index": index})
