"""Resumable sweeps: a rerun of the same multirun skips the jobs its ``jobs.jsonl`` records as completed.

``JobStatusCallback`` (alignexp/scale/hardware.py) appends one line per finished job to
``<sweep dir>/jobs.jsonl``. A job of a rerun whose number and overrides match a line with status
``COMPLETED``, and whose run folder still holds its ``eval.json``, returns that record instead of running
again; a failed, interrupted or changed job runs.

Progress: the callback also writes the sweep's size (:func:`sweep_size`) to ``<sweep dir>/jobs_total`` when the
multirun starts, and each finished job prints ``k of N jobs finished``; a driver that runs sweeps in child
processes (the study's, the IMDb experiment's) reads the same two files (:func:`sweep_progress`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

TOTAL_FILE = "jobs_total"


def completed_job(sweep_dir: str | Path, num: int, overrides: list[str], output_dir: str | Path) -> dict | None:
    """The eval.json record of job ``num`` if ``jobs.jsonl`` says it completed with the same overrides."""
    record = Path(output_dir) / "eval.json"
    if not record.exists():
        return None
    for job in job_records(sweep_dir):
        if job.get("num") == num and job.get("status") == "COMPLETED" and list(job.get("overrides", [])) == overrides:
            return json.loads(record.read_text())
    return None


def job_records(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``<sweep_dir>/jobs.jsonl`` that parse (none where it does not exist); a torn last line of an
    interrupted sweep is skipped."""
    path = Path(sweep_dir) / "jobs.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            job = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(job, dict):
            records.append(job)
    return records


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


def sweep_size(config) -> int | None:
    """How many jobs a multirun launches, from its composed config: the Optuna sweeper's ``n_trials``, else the
    product of the sizes of the sweep overrides (the command line's over ``hydra.sweeper.params``); None where
    that cannot be told before the sweep (a ``glob`` over a config group)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    sweeper = config.hydra.sweeper
    if sweeper.get("n_trials") is not None:
        return int(sweeper.n_trials)
    params = sweeper.get("params") or {}
    overrides = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task))}
    total = 1
    for override in overrides.values():
        if override.is_sweep_override():
            try:
                total *= len(list(override.sweep_string_iterator()))
            except HydraException:
                return None
    return total


def sweep_progress(sweep_dir: str | Path) -> tuple[int, int | None]:
    """(jobs finished, jobs in the sweep or None) of the sweep in ``sweep_dir``: the distinct job numbers in its
    ``jobs.jsonl`` (a rerun's jobs count once), and the size its callback wrote when it started."""
    done = {job["num"] for job in job_records(sweep_dir) if "num" in job}
    total_file = Path(sweep_dir) / TOTAL_FILE
    text = total_file.read_text().strip() if total_file.exists() else ""
    return len(done), int(text) if text.isdigit() else None


def watch(process, sweep_dir: str | Path, prefix: str, every_s: float = 20.0) -> int:
    """Wait for a child ``process`` (a ``subprocess.Popen`` running a sweep into ``sweep_dir``), printing
    ``<prefix>: k of N jobs finished`` whenever k grows; its exit code."""
    last = -1
    while True:
        try:
            code = process.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
            code = None
        done, total = sweep_progress(sweep_dir)
        if done != last and (done or code is not None):
            print(f"{prefix}: {done} of {total if total is not None else '?'} jobs finished", flush=True)
            last = done
        if code is not None:
            return code
