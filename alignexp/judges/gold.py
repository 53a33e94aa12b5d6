"""The gold judge: a task's programmatic gold reward r*(x, y) (the synthetic task has one)."""

from __future__ import annotations

import hashlib
import json
import random
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
        self.rewards_fn = task.gold_rewards

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        return [float(r) for r in self.rewards_fn(list(prompts), list(responses))]


class NoisyGoldJudge(GoldJudge):
    """The gold reward plus Gaussian noise: a stand-in for an imperfect judge (an LLM judge's errors).

    score(x, y) = r*(x, y) + noise * z, with z ~ N(0, 1) drawn from a stream keyed by (``seed``, x, y), so
    the same response is always scored the same; two responses are then ordered against the gold reward
    with probability Phi(|r*_1 - r*_2| / (noise * sqrt 2)) (Thurstone's model).
    """

    name = "noisy_gold"

    def __init__(self, task: Task, noise: float = 0.2, seed: int = 0, **_: Any):
        super().__init__(task)
        if not noise >= 0:
            raise ValueError(f"judge.noise must be >= 0, got {noise}")
        self.noise, self.seed = float(noise), int(seed)

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        gold = super().score(prompts, responses)
        return [g + self.noise * random.Random(self._key(p, r)).gauss(0.0, 1.0)
                for g, p, r in zip(gold, prompts, responses)]

    def _key(self, prompt: Text, response: Text) -> str:
        return hashlib.sha256(json.dumps([self.seed, prompt, str(response)]).encode()).hexdigest()
