"""The report's tuning section: each Optuna study below the report's folder (:func:`alignexp.tuning.find_studies`),
its trials (parameters, objective, state) and its best trial."""

from __future__ import annotations

import csv
import io
import math

from alignexp.tuning import Study


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    return "-inf (over the KL budget)" if value == -math.inf else f"{value:.4g}"


def _param(text: str) -> str:
    """A parameter's value as the override gave it, numbers to 4 significant digits."""
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def study_markdown(study: Study) -> str:
    """A study's heading line, its trials as a table (the best in bold) and its best trial."""
    objective = study.objective.metric + (f" at KL <= {study.objective.kl_budget:g} ({study.objective.kl_metric})"
                                          if study.objective.kl_budget is not None else "")
    states = {s: sum(t.state == s for t in study.trials) for s in ("COMPLETE", "FAILED", "INCOMPLETE")}
    lines = [f"### {study.folder}\n",
             f"Objective: {study.direction} {objective}; {len(study.trials)} trials ({states['COMPLETE']} complete, "
             f"{states['FAILED']} failed, {states['INCOMPLETE']} incomplete).\n",
             "| trial | " + " | ".join(study.params) + " | objective | state |",
             "|---" * (len(study.params) + 3) + "|"]
    best = study.best
    for trial in study.trials:
        cells = [f"#{trial.number}", *(_param(trial.params.get(p, "-")) for p in study.params), _value(trial.value),
                 trial.state.lower()]
        if best is not None and trial.number == best.number:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if best is None:
        lines.append("\nBest trial: none completed.")
    else:
        params = ", ".join(f"{k}={v}" for k, v in best.params.items())
        lines.append(f"\nBest trial: #{best.number} ({params}): {_value(best.value)}, in {best.folder}")
    return "\n".join(lines) + "\n"


def studies_markdown(studies: list[Study]) -> str:
    return "## Tuning (Optuna)\n\n" + "\n".join(study_markdown(s) for s in studies)


def trials_csv(studies: list[Study]) -> str:
    params = sorted({p for s in studies for p in s.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["study", "trial", *params, "objective", "state", "best"])
    for study in studies:
        best = study.best
        for t in study.trials:
            writer.writerow([study.folder, t.number, *(t.params.get(p, "") for p in params),
                             "" if t.value is None else t.value, t.state.lower(),
                             best is not None and t.number == best.number])
    return out.getvalue()
