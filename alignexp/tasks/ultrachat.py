"""UltraChat 200k (``HuggingFaceH4/ultrachat_200k``): multi-turn SFT on assistant turns only.

Records: ``prompt`` (the first user turn), ``prompt_id``, ``messages[{role, content}]``; splits
``train_sft`` / ``test_sft`` (and ``train_gen`` / ``test_gen``).

* **SFT**: one example per assistant turn, whose prompt is the message list before it and whose
  response is that turn's content (a string). Summing these responses' log-probs sums exactly the
  conversation's assistant tokens, so the loss is on assistant turns only.
* **Evaluation**: the first exchange of each held-out conversation (the messages before the first
  assistant turn; that turn is ``responses[0]`` and ``target``).
* No preference data: :meth:`UltraChatTask.preference_examples` raises (use ``task=ultrafeedback``).
"""

from __future__ import annotations

from typing import Any

from alignexp.tasks.base import RankedExample, assistant_turn_examples, get_field, messages_value
from alignexp.tasks.loading import RecordTask, record_sources


class UltraChatTask(RecordTask):
    """See the module docstring. ``split`` is the SFT split, ``eval_split`` the held-out one."""

    offline_preferences = False

    def __init__(self, name: str = "ultrachat", path: str | None = None,
                 hub_id: str | None = "HuggingFaceH4/ultrachat_200k", split: str = "train_sft",
                 eval_split: str = "test_sft", **common: Any):
        super().__init__(name, path, split, **common)
        self.hub_id, self.eval_split = hub_id, eval_split

    def _conversations(self, split: str, parse, what: str) -> list[RankedExample]:
        return self.load(record_sources(self.path, split, hub_id=self.hub_id), parse, what=what)

    def sft_examples(self, split: str | None = None) -> list[RankedExample]:
        return self._conversations(self.resolve_split(split, self.split), parse_conversation, "sft")

    def eval_examples(self) -> list[RankedExample]:
        def first_exchange(record: Any, index: int, source: str) -> RankedExample:
            example = parse_conversation(record, index, source)[0]
            example.target = example.responses[0]
            return example

        return self.eval_subset(self._conversations(self.eval_split, first_exchange, "eval"))

    def preference_examples(self, split: str | None = None, sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        raise ValueError("task=ultrachat has SFT data only, no preferences and no gold reward to rank samples "
                         "with: train its SFT policy here, then use task=ultrafeedback for preferences")


def parse_conversation(record: Any, index: int, source: str) -> list[RankedExample]:
    """One example per assistant turn of ``record["messages"]``."""
    messages = messages_value(get_field(record, "messages", source, index), source, index, "messages")
    return assistant_turn_examples(messages, source, index,
                                   meta={"prompt_id": record.get("prompt_id")})
