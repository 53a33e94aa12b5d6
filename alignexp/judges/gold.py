"""The gold judge: a task's programmatic gold reward r*(x, y) (the synthetic task has one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alignexp.judges.base import ScoreJudge
from alignexp.tasks.base import Text


class GoldJudge(ScoreJudge):
    """Scores responses with the task's gold reward; ``compare`` (1 / 0 / 0.5 for a tie) and ``rank`` follow
    from the scores (:class:`alignexp.judges.base.ScoreJudge`)."""

    name = "gold"

    def __init__(self, reward_fn: Callable[[Text, Text], float]):
        self.reward_fn = reward_fn

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return [float(self.reward_fn(p, r)) for p, r in zip(prompts, responses)]
