"""Tasks: raw records -> :class:`RankedExample`, one module per task (the ``task`` config group).

Every task derives from :class:`Task` (``alignexp/tasks/base.py``), which lists what a task offers
and declares (``has_gold_reward``, ``trains_sft_policy``, ``offline_preferences``).
``conf/task/<name>.yaml`` names the class with ``_target_`` and gives its arguments.
"""

from __future__ import annotations

from alignexp.tasks.base import DataError, LoadReport, RankedExample, Task, Validator, truncate_rankings

__all__ = ["DataError", "LoadReport", "RankedExample", "Task", "Validator", "truncate_rankings"]
