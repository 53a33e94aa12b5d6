"""Judges: text in, scores and verdicts out, behind one interface (:mod:`alignexp.judges.base`).

* ``gold``: the task's programmatic gold reward (:class:`GoldJudge`);
* ``reward_model``: a trained reward model's folder (:class:`alignexp.judges.reward_model.RewardModelJudge`);
* ``llm``: an OpenAI-compatible chat endpoint with the DPO paper's prompts
  (:class:`alignexp.judges.llm.LLMJudge`);
* ``auto``: the gold reward where the task has one, else no judge; ``none``: no judge.

:func:`build_judge` builds one from an option of the ``judge`` config group (``conf/judge/<name>.yaml``,
its class named by ``_target_``), wherever it sits: the run's judge (``judge=``), a sampler's
(``judge@sampler.judge=``) or PPO's (``judge@ppo.judge=``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alignexp.args import instantiate_target
from alignexp.errors import AlignexpError, ConfigError
from alignexp.judges.base import Judge, ScoreJudge, rank_by_comparisons
from alignexp.judges.gold import GoldJudge

GOLD = {"_target_": "alignexp.judges.gold.GoldJudge", "name": "gold"}


def build_judge(config: Mapping[str, Any], task: Any, key: str = "judge", **runtime: Any) -> Judge | None:
    """The judge ``config`` describes (None for ``none``, and for ``auto`` on a task without a gold reward).

    ``runtime``: objects a judge may use (``device`` for a reward model). Errors name ``key``.
    """
    config = {k: v for k, v in dict(config).items() if v is not None}
    name = config.get("name", "auto")
    if name == "none":
        return None
    if name == "auto":
        if not task.has_gold_reward:
            return None
        config = dict(GOLD)
    try:
        return instantiate_target(config, key, task=task, **runtime)
    except AlignexpError as error:  # a bad setting of this judge: named where it was set
        raise ConfigError(str(error).replace("judge.", f"{key}.").replace(f"{key}: {key}.", f"{key}.")) from None


__all__ = ["GoldJudge", "Judge", "ScoreJudge", "build_judge", "rank_by_comparisons"]
