"""The run context every stage reads and fills, and the table of stages (the stages-and-ranks contract).

A run is a list of stages (:func:`alignexp.pipeline.plan`), each a function of one
:class:`RunContext`, registered here by name with how it runs on N processes. The loss and the
sampler declare which training stage they need (``register_loss(..., stage=...)``, a sampler's
``stage``); nothing compares their names. A user's own stage registers the same way, from a module
listed in ``imports``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignexp.args import HardwareArgs, ModelArgs, RunArgs
from alignexp.losses.registry import LossSpec
from alignexp.tasks.base import Task


@dataclass
class RunContext:
    """One run: its arguments, task, loss and sampler, and what the stages build (weights, models, record).

    ``init`` is the folder or hub id the policy starts from, and the reference is (None: built from
    ``model.arch``); ``record`` is the eval.json record once a stage has written it, and ``record_extra``
    what a training stage adds to it (``global_batch_size``).
    """

    args: RunArgs
    task: Task
    spec: LossSpec
    sampler: Any
    init: str | None = None
    tokenizer: Any = None
    policy: Any = None
    reference: Any = None
    record: dict = field(default_factory=dict)
    record_extra: dict = field(default_factory=dict)
    backend: Any = None
    caches: list[Path] = field(default_factory=list)

    @property
    def hw(self) -> HardwareArgs:
        return self.args.hardware

    @property
    def out(self) -> Path:
        return self.args.output_dir

    @property
    def model_args(self) -> ModelArgs:
        """The model settings for the weights the policy starts from."""
        return self.args.model.with_path(self.init)


@dataclass(frozen=True)
class Stage:
    """A registered stage. ``ranks`` says how it runs on N processes; ``trains_policy``: the trained policy
    is saved and evaluated after it. ``checks``: what the stage needs, checked before any model is built
    (:mod:`alignexp.preflight` runs those of the stages a run will execute); each takes the run's context,
    without models, and raises an :class:`~alignexp.errors.AlignexpError` naming the key to fix."""

    name: str
    run: Callable[[RunContext], None]
    ranks: str
    trains_policy: bool = True
    doc: str = ""
    checks: tuple[Callable[[RunContext], None], ...] = ()


STAGES: dict[str, Stage] = {}


Check = Callable[[RunContext], None]


def register_stage(name: str, *, ranks: str, trains_policy: bool = True, check: Check | Sequence[Check] = ()):
    """Decorator: register ``fn(ctx: RunContext) -> None`` as the stage ``name``; ``check``: one function
    or several (each problem its own message) that check, before the run, what the stage will need."""
    checks = (check,) if callable(check) else tuple(check)

    def decorator(fn: Callable[[RunContext], None]) -> Callable[[RunContext], None]:
        if name in STAGES:
            raise KeyError(f"stage '{name}' is registered twice")
        STAGES[name] = Stage(name, fn, ranks, trains_policy, (fn.__doc__ or "").strip().split("\n")[0], checks)
        return fn

    return decorator


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; registered stages: {', '.join(sorted(STAGES))}") from None
