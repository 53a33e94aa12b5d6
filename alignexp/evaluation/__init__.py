"""Evaluation: a policy against its reference (:mod:`.policy`), metric-human agreement (:mod:`.agreement`),
benchmark answer files (:mod:`.exports`), and eval.json with its printed tables and headline metrics
(:mod:`.results`). ``python -m alignexp.evaluate`` is the command line; docs/evaluation.md the metrics."""

from alignexp.evaluation.policy import evaluate_policy
from alignexp.evaluation.results import HEADLINE_METRICS, format_table, write_eval_json

__all__ = ["HEADLINE_METRICS", "evaluate_policy", "format_table", "write_eval_json"]
