"""The gold judge: a task's programmatic gold reward r*(x, y) (the synthetic task has one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alignexp.judges.base import ScoreJudge
from alignexp.tasks.base import Text


class GoldJudge(ScoreJudge):
    """Scores responses with the task's gold reward; compares two by their scores (ties are ties)."""

    name = "gold"

    def __init__(self, reward_fn: Callable[[Text, Text], float]):
        self.reward_fn = reward_fn

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return [float(self.reward_fn(p, r)) for p, r in zip(prompts, responses)]

    def compare(self, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text]) -> list[float]:
        """1 where ``first`` wins, 0 where ``second`` wins, 0.5 for a tie."""
        return super().compare(prompts, first, second)
