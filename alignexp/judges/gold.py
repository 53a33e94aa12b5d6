"""The gold judge: a task's programmatic gold reward r*(x, y) (the synthetic task has one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignexp.judges.base import ScoreJudge
from alignexp.tasks.base import Task, Text


class GoldJudge(ScoreJudge):
    """Scores responses with the task's gold reward; ``compare`` (1 / 0 / 0.5 for a tie) and ``rank`` follow
    from the scores (:class:`alignexp.judges.base.ScoreJudge`)."""

    name = "gold"

    def __init__(self, task: Task, **_: Any):
        if not task.has_gold_reward:
            raise ValueError(f"judge.name=gold: task '{task.name}' has no gold reward; use judge=reward_model "
                             f"(with judge.path) or judge=llm")
        self.reward_fn = task.gold_reward

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return [float(self.reward_fn(p, r)) for p, r in zip(prompts, responses)]
