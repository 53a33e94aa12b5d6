"""Tasks: raw records -> :class:`RankedExample`, one module per task (the ``task`` config group).

Every task object offers the same three methods (duck-typed, see :class:`Task`):

* ``sft_examples(split)``: demonstrations, one response each (or ``target``), for SFT;
* ``preference_examples(split, sample_fn=None, n_responses=None)``: rankings (n >= 2), best first;
* ``eval_examples()``: held-out prompts, with a reference response as ``responses[0]`` where the task
  has one (human summary, reference translation, dataset's preferred response);

and ``has_gold_reward`` / ``gold_reward(prompt, response)`` where a programmatic gold reward exists.
``conf/task/<name>.yaml`` names the class with ``_target_`` and gives its arguments.
"""

from __future__ import annotations

from typing import Protocol

from alignexp.tasks.base import DataError, LoadReport, RankedExample, Validator, truncate_rankings


class Task(Protocol):
    name: str
    has_gold_reward: bool

    def sft_examples(self, split: str = "train") -> list[RankedExample]: ...

    def preference_examples(self, split: str = "train", sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]: ...

    def eval_examples(self) -> list[RankedExample]: ...


__all__ = ["DataError", "LoadReport", "RankedExample", "Task", "Validator", "truncate_rankings"]
