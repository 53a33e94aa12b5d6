"""Judges: text in, scores and verdicts out, behind one interface (:mod:`alignexp.judges.base`).

* ``gold``: the task's programmatic gold reward (:class:`GoldJudge`);
* ``reward_model``: a trained reward model's folder (:class:`alignexp.judges.reward_model.RewardModelJudge`);
* ``llm``: an OpenAI-compatible chat endpoint with the DPO paper's prompts
  (:class:`alignexp.judges.llm.LLMJudge`).

:func:`build_judge` builds one from its config (``conf/judge/<name>.yaml`` or a sampler's ``judge``).
"""

from __future__ import annotations

from typing import Any

from alignexp.judges.base import Judge, ScoreJudge, rank_by_comparisons
from alignexp.judges.gold import GoldJudge

JUDGES = ("gold", "reward_model", "llm")


def build_judge(name: str, task: Any = None, **kwargs: Any) -> Judge:
    """The judge ``name`` with its settings (``path`` for ``reward_model``; ``base_url``, ``model``, ... for
    ``llm``). ``gold`` needs a task with a gold reward. Errors name the config key."""
    if name == "gold":
        if task is None or not getattr(task, "has_gold_reward", False):
            raise ValueError(f"judge.name=gold needs a task with a gold reward; task "
                             f"'{getattr(task, 'name', None)}' has none (use judge.name=reward_model or llm)")
        return GoldJudge(task.gold_reward)
    if name == "reward_model":
        from alignexp.judges.reward_model import RewardModelJudge

        return RewardModelJudge(**kwargs)
    if name == "llm":
        from alignexp.judges.llm import LLMJudge

        for key in ("base_url", "model"):
            if not kwargs.get(key):
                raise ValueError(f"judge.{key}: the llm judge needs it (an OpenAI-compatible endpoint and its model)")
        return LLMJudge(**kwargs)
    raise ValueError(f"judge.name: unknown judge '{name}'; known: {', '.join(JUDGES)}")


__all__ = ["JUDGES", "GoldJudge", "Judge", "ScoreJudge", "build_judge", "rank_by_comparisons"]
