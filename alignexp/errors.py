"""The failures a user can act on, and the one mapping from them to exit codes for every CLI.

Every user-facing error derives from :class:`AlignexpError`; its message names the key, file or record
and says what to do. The entry points print it without a traceback and exit with its ``exit_code``
(2 for a bad setting, 1 for anything else a user can fix: data, models, endpoints). Inside a Hydra
multirun the error is raised instead, so the sweep records the job as failed and runs the others.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class AlignexpError(Exception):
    """A failure the user can fix; the message says how. Exit status 1."""

    exit_code = 1
    label = "error"


class ConfigError(AlignexpError, ValueError):
    """A bad value or key in the composed config; the message names the key. Exit status 2."""

    exit_code = 2
    label = "config error"


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # the GPU check runs without Hydra
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; an :class:`AlignexpError` is printed as one line and exits with its status."""
    try:
        return fn(*args)
    except AlignexpError as error:
        if _in_multirun():
            raise  # recorded in jobs.jsonl; the sweep's other jobs still run
        print(f"{error.label}: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
