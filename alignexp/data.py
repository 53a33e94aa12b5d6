"""Inspect a task's data: ``python -m alignexp.data task=<name> [task.path=...] [task.split=...] [stage=...]``.

Loads and validates the task's examples for one stage, then prints a JSON summary (records read,
examples produced, responses per prompt, ties, length percentiles in characters, skips by reason)
and a few rendered examples. ``stage=auto`` (the default) shows the task's preference data where it
has its own, its SFT data otherwise (the synthetic task samples preferences from a policy, so it
shows its SFT demonstrations). The exit status is 1 when an invalid record stops loading (set
``task.skip_invalid=true`` to count and skip such records instead), the data cannot be read, or no
example is left after the task's filters (the message names each filter and its count), and 2 for a
bad setting; the message is printed without a traceback. A filter that drops more than half of the
records is a warning, in the summary's ``warnings`` and on stderr.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from alignexp.config import CONF_DIR, build_task
from alignexp.errors import ConfigError, run_cli
from alignexp.tasks.base import DataError, LoadReport, RankedExample, Task, Text, has_ties
from alignexp.tasks.loading import NoExamples, text_length

STAGES = ("auto", "preference", "sft", "eval")
log = logging.getLogger("alignexp.data")


def percentiles(values: Sequence[int]) -> dict[str, float]:
    """Nearest-rank percentiles (p50, p90, p99), the mean and the extremes; {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    return {"min": ordered[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 1)}


def summarize(examples: Sequence[RankedExample], report: LoadReport | None, task: str, stage: str,
              split: str | None) -> dict[str, Any]:
    """The JSON summary of one stage's examples (and the load report, where the task keeps one)."""
    sizes = Counter(ex.n for ex in examples)
    tied_pairs = [has_ties(ex.scores) for ex in examples]
    summary: dict[str, Any] = {
        "task": task, "stage": stage, "split": split,
        "source": report.source if report else task,
        "records": report.records if report else len(examples),
        "examples": len(examples),
        "responses_per_prompt": {str(k): v for k, v in sorted(sizes.items())},
        "examples_with_scores": sum(ex.scores is not None for ex in examples),
        "examples_with_ties": sum(t > 0 for t in tied_pairs),
        "tied_adjacent_pairs": sum(tied_pairs),
        "examples_with_target": sum(ex.target is not None for ex in examples),
        "chat_prompts": sum(isinstance(ex.prompt, list) for ex in examples),
        "prompt_chars": percentiles([text_length(ex.prompt) for ex in examples]),
        "response_chars": percentiles([text_length(r) for ex in examples for r in ex.responses]),
        "skipped": dict(sorted(report.skipped.items())) if report else {},
        "skipped_total": sum(report.skipped.values()) if report else 0,
        "left_out": dict(sorted(report.filtered.items())) if report else {},
        "over_length": dict(sorted(report.truncated.items())) if report else {},
        "warnings": filter_warnings(report),
    }
    return summary


def filter_warnings(report: LoadReport | None) -> list[str]:
    """A warning for each filter (a setting that leaves records out, or invalid records skipped) that
    drops more than half of the records read (or one for all of them, where together they do)."""
    if report is None or not report.records:
        return []
    counts = {**report.filtered, **{f"skipped as invalid: {k}": v for k, v in report.skipped.items()}}
    warnings = [f"{reason}: {count} of {report.records} records left out" for reason, count in sorted(counts.items())
                if count > report.records / 2]
    total = sum(counts.values())
    if not warnings and total > report.records / 2:
        warnings.append(f"{total} of {report.records} records left out in all ({report.left_out()})")
    return warnings


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def render_text(text: Text, limit: int) -> str:
    """A prompt or response for reading: strings as they are, messages one ``[role] content`` per turn."""
    if isinstance(text, str):
        return _clip(text, limit)
    return "\n".join(f"[{m['role']}] {_clip(m['content'], limit)}" for m in text)


def render_example(example: RankedExample, number: int, limit: int) -> str:
    where = ", ".join(f"{k} {example.meta[k]}" for k in ("source", "index") if k in example.meta)
    lines = [f"=== example {number} ({where}; {example.n} response{'s' * (example.n != 1)}) ==="]
    lines += ["--- prompt ---", render_text(example.prompt, limit)]
    for j, response in enumerate(example.responses):
        score = f" (score {example.scores[j]:g})" if example.scores is not None else ""
        lines += [f"--- response {j + 1}{score} ---", render_text(response, limit)]
    if example.target is not None and example.target != example.responses[0]:
        lines += ["--- target ---", render_text(example.target, limit)]
    return "\n".join(lines)


def load_stage(task: Task, stage: str, settings: dict[str, Any]) -> tuple[str, str | None, list[RankedExample]]:
    """Run one stage of ``task`` (``settings``: the task's config); returns (stage, split, examples)."""
    if stage == "auto":
        stage = "preference" if task.offline_preferences else "sft"
    if stage == "preference":
        split = settings.get("split")
        return stage, split, task.preference_examples(split) if split else task.preference_examples()
    if stage == "sft":  # tasks with one kind of data (ultrachat, custom) read their SFT data at task.split
        split = settings.get("sft_split") if "sft_split" in settings else settings.get("split")
        return stage, split, task.sft_examples(split) if split else task.sft_examples()
    return stage, settings.get("eval_split"), task.eval_examples()


def run(cfg: DictConfig) -> int:
    """Load, validate, print the summary and examples; the exit status."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    settings = OmegaConf.to_container(cfg.task, resolve=True)
    task = build_task(settings)
    try:
        stage, split, examples = load_stage(task, cfg.stage, settings)
    except DataError as error:
        raise error.with_skip_hint() from None
    if not examples:  # record tasks raise NoExamples themselves, naming their filters
        raise NoExamples(f"task {task.name}: no {stage} examples (split {split}); check the task's settings")
    summary = summarize(examples, task.last_report, task.name, stage, split)
    for warning in summary["warnings"]:
        log.warning("more than half of the records are left out: %s", warning)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for number, example in enumerate(examples[: cfg.n_show], start=1):
        print(render_example(example, number, cfg.max_show_chars))
    return 0


@hydra.main(config_path=CONF_DIR, config_name="data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(levelname)s] %(name)s: %(message)s")
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
