"""Resumable sweeps: a rerun of the same multirun skips the jobs its ``jobs.jsonl`` records as completed.

``JobStatusCallback`` (alignexp/scale/hardware.py) appends one line per finished job to
``<sweep dir>/jobs.jsonl``. A job of a rerun whose number and overrides match a line with status
``COMPLETED``, and whose run folder still holds its ``eval.json``, returns that record instead of running
again; a failed, interrupted or changed job runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def completed_job(sweep_dir: str | Path, num: int, overrides: list[str], output_dir: str | Path) -> dict | None:
    """The eval.json record of job ``num`` if ``jobs.jsonl`` says it completed with the same overrides."""
    path = Path(sweep_dir) / "jobs.jsonl"
    record = Path(output_dir) / "eval.json"
    if not path.exists() or not record.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            job: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of an interrupted sweep
            continue
        if job.get("num") == num and job.get("status") == "COMPLETED" and list(job.get("overrides", [])) == overrides:
            return json.loads(record.read_text())
    return None


def previous_result() -> dict | None:
    """Inside a Hydra multirun job: its earlier completed result, if any (see the module docstring)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return completed_job(hydra_cfg.sweep.dir, hydra_cfg.job.num, list(hydra_cfg.overrides.task),
                         hydra_cfg.runtime.output_dir)
