"""Fail in the first seconds: every input a command will need, resolved and checked before any model is built.

Each command (train, sample, evaluate) calls its preflight after validating its settings and building
the task, and before anything heavy: the hardware (``hardware.accelerator=gpu`` needs a CUDA device),
the output and cache folders (writable), the weights (a folder that holds a model, or a hub id that is
cached or on the hub; nothing is downloaded), the judges (a reward model's folder holds a reward model,
an LLM endpoint answers ``GET <base_url>/models``), and the data: for a training run, the checks that
each stage of :func:`alignexp.pipeline.plan` declares (``register_stage(..., check=...)``): the
training data after every filter, the SFT data where the SFT policy will be trained, the evaluation
data. Data that exists only after sampling is checked after sampling, before training.

Every problem found is reported, one message each (naming the key, the file and the fix); one problem
is raised as it is, several as one :class:`PreflightError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignexp.disk import check_free_space
from alignexp.errors import AlignexpError, ConfigError
from alignexp.inputs import (
    check_accelerator,
    check_eval_data,
    check_judge,
    check_model_source,
    check_writable,
)

log = logging.getLogger(__name__)

USER_ERRORS = (AlignexpError, ValueError, NotImplementedError)
"""What a check raises for a problem the user can fix (tasks and samplers raise ValueError naming the key)."""


class PreflightError(AlignexpError):
    """Several problems found before anything was built; the message lists each. Exit status 2 when every
    one is a bad setting, else 1."""

    def __init__(self, problems: list[BaseException], command: str):
        self.problems = problems
        if all(isinstance(p, ConfigError) for p in problems):
            self.exit_code, self.label = ConfigError.exit_code, ConfigError.label
        lines = "\n".join(f"  {i}. " + str(p).replace("\n", "\n     ") for i, p in enumerate(problems, start=1))
        super().__init__(f"{command}: {len(problems)} problems, found before any model was built:\n{lines}")


class Preflight:
    """Collects the problems of several checks, so that one run reports all of them."""

    def __init__(self, command: str):
        self.command = command
        self.problems: list[BaseException] = []

    def check(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; a problem it raises is kept (None is returned) instead of stopping the others."""
        try:
            return fn(*args)
        except USER_ERRORS as error:
            self.add(error)
            return None

    def add(self, error: BaseException) -> None:
        """Keep ``error``, unless it repeats one already kept (two stages reading one bad file: the training
        and the evaluation data of one file give one problem, in the context where it was found first)."""
        text = getattr(error, "core", str(error))
        if not any(text == getattr(p, "core", None) or str(p).endswith(text) or text.endswith(str(p))
                   for p in self.problems):
            self.problems.append(error)

    def finish(self) -> None:
        """Raise the one problem found as it is, or all of them as a :class:`PreflightError`."""
        if len(self.problems) == 1:
            problem = self.problems[0]
            if isinstance(problem, AlignexpError):
                raise problem
            raise ConfigError(str(problem)) from problem
        if self.problems:
            raise PreflightError(self.problems, self.command)
        log.info("%s: inputs checked", self.command)


def _common(flight: Preflight, hw: Any, folders: dict[str, Any]) -> None:
    flight.check(check_accelerator, hw)
    for key, folder in folders.items():
        flight.check(check_writable, folder, key)


def preflight_train(args: Any, task: Any) -> None:
    """A training run (:mod:`alignexp.train`): the hardware, the run and cache folders, then the checks of
    each stage the run will execute, in order (the weights stage resolves what the policy starts from)."""
    from alignexp.config import instantiate_target
    from alignexp.losses import get_loss
    from alignexp.pipeline import RunContext, get_stage, plan

    flight = Preflight("train")
    _common(flight, args.hardware, {"paths.output_dir": args.output_dir, "paths.cache_dir": args.cache_dir})
    flight.check(check_free_space, args, task)
    spec = get_loss(args.loss.name)
    ctx = RunContext(args=args, task=task, spec=spec, sampler=instantiate_target(args.sampler, "sampler"))
    for name in plan(spec, ctx.sampler):
        for check in get_stage(name).checks:
            flight.check(check, ctx)
    if not flight.problems:  # the weights it starts from are resolved (ctx.init): their architecture
        given = args.init_from or args.model.path  # else the task's SFT policy, or a model, of model.arch
        flight.check(check_model, args, ctx.init if given else None, "init_from" if args.init_from else "model.path")
    flight.finish()
    for warning in setup_warnings(args, task):
        log.warning(warning)


def setup_warnings(args: Any, task: Any) -> list[str]:
    """What runs but is likely a mistake, each with the key that fixes it: a randomly initialised model
    trained on a dataset task's text, and the task's own warnings (evaluating on the training data)."""
    warnings = []
    if not args.init_from and not args.model.path and not task.trains_sft_policy:
        warnings.append(f"model={args.model.name} has no weights (model.path=null, init_from=null): a randomly "
                        f"initialised model will be trained on task {task.name}'s data and evaluated as it is. Set "
                        f"model.path=<a pretrained model's folder or hub id> (or model=smollm2_135m after `make "
                        f"assets`), or init_from=<a run's policy>")
    return warnings + list(task.setup_warnings())


def check_model(args: Any, source: Any, key: str) -> None:
    """The architecture of the model a run will build (``source``: a folder or hub id, or None for
    ``model.arch``, which the task's SFT policy has too), refused up front where alignexp cannot train it
    exactly on this hardware (:func:`alignexp.models.backbone.check_architecture`)."""
    from alignexp.models.backbone import check_architecture, model_config

    if source is None:
        key = "model.arch"
    try:
        config = model_config(args.model, None if source is None else str(source))
    except (OSError, ValueError, KeyError):
        return  # unreadable weights are the weights check's to report
    check_architecture(config, args.hardware.strategy, key)


def preflight_sample(args: Any, task: Any, policy: str | None, split: str, output: Path) -> str | None:
    """``python -m alignexp.sample``: the policy (``policy``, ``model.path`` or the task's SFT policy), the
    prompts of ``split``, the judge, the output file's folder. Returns the policy it resolved."""
    from alignexp.pipeline.weights import check_weights_source

    flight = Preflight("sample")
    _common(flight, args.hardware, {})
    flight.check(check_writable, output.parent, "output", f"output={output}")
    resolved = flight.check(check_weights_source, args, task, policy, "policy", True)
    if not flight.problems and resolved is None:
        flight.add(ConfigError(f"policy: task '{task.name}' has no SFT policy of its own; set "
                                           f"policy=<HF folder> (e.g. a run's policy/) or model.path="))
    if flight.check(task.prompts, split) == []:
        flight.add(AlignexpError(f"split={split}: task '{task.name}' has no prompts in it"))
    flight.check(check_judge, args.judge, task, "judge")
    flight.finish()
    return resolved


def preflight_evaluate(args: Any, task: Any, wants_judge: bool) -> None:
    """``python -m alignexp.evaluate``: the policy and reference folders, the mode's data (the evaluation
    data for ``mode=policy`` and ``prompting``, with the demonstrations of its shots; the labelled rankings
    for ``agreement``; the question files for ``export``), the judge, the output folder. ``task`` is None
    for ``mode=benchmarks``, whose tasks the harness checks."""
    flight = Preflight("evaluate")
    _common(flight, args.hardware, {"paths.output_dir": args.output_dir})
    sources = [(args.policy, "policy"), (args.reference, "reference")]
    for path, key in sources:
        if path is not None:
            flight.check(check_model_source, str(path), key, "model", key == "policy" or args.policy is None)
    if args.policy is None and args.reference is None and args.model.path:
        flight.check(check_model_source, args.model.path, "model.path")
    if args.mode in ("policy", "prompting"):
        flight.check(check_eval_data, task, args.eval)
    if args.mode == "prompting" and args.prompting.shots:
        flight.check(check_demonstrations, task, args.prompting.split)
    if args.mode == "agreement":
        flight.check(check_agreement_data, task, args)
    for key in ("alpaca_eval", "mt_bench") if args.mode == "export" else ():
        path = getattr(args.export, key)
        if path and not Path(path).expanduser().is_file():
            flight.add(ConfigError(f"export.{key}={path}: no such file"))
    if wants_judge:
        flight.check(check_judge, args.judge, task, "judge")
    flight.finish()


def check_agreement_data(task: Any, args: Any) -> None:
    """``mode=agreement``: the task's labelled held-out rankings, or a reference to sample them from."""
    if task.samples_preferences:
        if args.reference is None:
            raise ConfigError(f"reference: mode=agreement on task {task.name}, which samples its rankings, needs "
                              f"reference=<HF folder> (or policy=<run>/policy, whose eval.json names it)")
        return
    task.preference_examples(args.agreement.split or task.eval_split)  # NoExamples names the filters


def check_demonstrations(task: Any, split: str) -> None:
    """``mode=prompting`` with shots: the pool its demonstrations are drawn from is not empty."""
    from alignexp.evaluation.prompting import demonstrations

    if not demonstrations(task, split):
        raise ConfigError(f"prompting.split={split}: task {task.name} has no demonstrations there for the shots")
