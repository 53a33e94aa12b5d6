"""What evaluation writes and prints: ``eval.json`` with its per-prompt file, the printed tables, and the
headline metrics that ``alignexp.report`` tabulates and plots across runs."""

from __future__ import annotations

import json
from pathlib import Path

from alignexp.files import atomic_write_json, atomic_write_text

PER_PROMPT_FILE = "eval_prompts.jsonl"
"""Beside eval.json: one JSON line per (temperature, held-out prompt) with each model's response, its
length in characters and tokens, its reward, and the judge's verdicts (docs/evaluation.md)."""

HEADLINE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("gold_reward", "policy", "gold_reward"),
    ("judge_score", "policy", "judge_score"),
    ("kl", "policy", "kl"),
    ("win_rate", "comparisons", "win_rate_vs_reference"),
    ("lc_win_rate", "comparisons", "win_rate_vs_reference_lc"),
    ("preference_accuracy", "policy", "preference_accuracy"),
    ("bleu", "policy", "bleu"),
    ("chrf", "policy", "chrf"),
    ("ter", "policy", "ter"),
    ("rouge_l", "policy", "rouge_l"),
    ("response_tokens", "policy", "response_tokens"),
)
"""(column, section of eval.json, key): the headline metrics, in the order tables show them."""

LABELS = {"gold_reward": "gold reward", "judge_score": "judge score", "kl": "KL to reference (nats)",
          "win_rate": "win rate vs reference", "lc_win_rate": "length-controlled win rate",
          "preference_accuracy": "preference accuracy", "bleu": "BLEU (0-100)", "chrf": "chrF (0-100)",
          "ter": "TER (0-100, lower better)", "rouge_l": "ROUGE-L F (0-100)", "response_tokens": "response tokens",
          "win_rate_vs_dataset": "win rate vs dataset"}
"""Printed names of the headline columns (and of the per-model win rate against the dataset), each with its
scale where it is not evident: win rates and accuracies are proportions in [0, 1]."""


def write_eval_json(path: str | Path, *, task: str, loss: str, model: str, result: dict, **extra) -> dict:
    """Write ``eval.json`` in the contract's schema (task, loss, model, n_prompts, policy, reference,
    comparisons; other fields added freely) in one atomic write, and the result's ``per_prompt`` rows to
    :data:`PER_PROMPT_FILE` beside it (eval.json's ``per_prompt_file`` names it). Returns the record."""
    result = dict(result)
    rows = result.pop("per_prompt", None)
    record = {"task": task, "loss": loss, "model": model, **result, **extra}
    if rows:
        path = Path(path)
        atomic_write_text(path.parent / PER_PROMPT_FILE,
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        record["per_prompt_file"] = PER_PROMPT_FILE
    atomic_write_json(path, record)
    return record


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics or not isinstance(metrics[key], (int, float)):
        return "-"
    stderr = metrics.get(key + "_stderr")
    return f"{metrics[key]:.3f} ± {stderr:.3f}" if isinstance(stderr, (int, float)) else f"{metrics[key]:.3f}"


def format_table(result: dict) -> str:
    """A reference-vs-policy table of the headline metrics present, then the win rate per temperature."""
    lines = [f"{'':<26}{'reference':>20}{'policy':>20}"]
    rows = [(column, key) for column, section, key in HEADLINE_METRICS if section == "policy"]
    for column, key in [*rows, ("win_rate_vs_dataset", "win_rate_vs_dataset")]:
        if key in result["reference"] or key in result["policy"]:
            lines.append(f"{LABELS[column]:<26}{_cell(result['reference'], key):>20}"
                         f"{_cell(result['policy'], key):>20}")
    comparisons = result["comparisons"]
    lines.append(f"{LABELS['win_rate']:<26}{'':>20}{_cell(comparisons, 'win_rate_vs_reference'):>20}"
                 f"  (judge: {comparisons.get('judge', '')}, baseline: {comparisons.get('baseline', '-')}, "
                 f"T={result.get('temperature')})")
    if "win_rate_vs_reference_lc" in comparisons:
        lines.append(f"{LABELS['lc_win_rate']:<26}{'':>20}{_cell(comparisons, 'win_rate_vs_reference_lc'):>20}"
                     f"  (95% CI {comparisons['win_rate_vs_reference_lc_ci_low']:.3f} to "
                     f"{comparisons['win_rate_vs_reference_lc_ci_high']:.3f})")
    by_temperature = result.get("by_temperature", {})
    if len(by_temperature) > 1:
        lines.append("  per temperature (the reference's figure, then the policy's, each at that temperature):")
        for t, entry in by_temperature.items():
            row = f"  T={t:<5}"
            for label, key in (("gold", "gold_reward"), ("judge", "judge_score")):
                if key in entry["policy"]:
                    row += f"  {label} {_cell(entry.get('reference') or {}, key)} -> {_cell(entry['policy'], key)}"
            if "kl" in entry["policy"]:
                row += f"  kl {_cell(entry['policy'], 'kl')}"
            for label, key in (("win", "win_rate_vs_reference"), ("lc", "win_rate_vs_reference_lc")):
                if key in entry["comparisons"]:
                    row += f"  {label} {_cell(entry['comparisons'], key)}"
            lines.append(row)
    for entry in result.get("best_of_n", []):
        lines.append(f"  best-of-{entry['n']:<4} KL {entry['kl']:.3f}  gold {_cell(entry, 'gold_reward')}")
    return "\n".join(lines)


def format_agreement(report: dict[str, dict]) -> str:
    """The agreement report as a table: metric, agreement, its 95% interval, ties and pairs judged."""
    lines = [f"{'metric':<20}{'agreement':>10}{'95% CI':>18}{'ties':>6}{'n':>7}"]
    for name, row in report.items():
        if row.get("agreement") is None:
            lines.append(f"{name:<20}{'-':>10}{'':>18}{'':>6}{0:>7}  ({row.get('skipped', '')})")
            continue
        ci = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        lines.append(f"{name:<20}{row['agreement']:>10.3f}{ci:>18}{row['ties']:>6}{row['n']:>7}")
    return "\n".join(lines)
