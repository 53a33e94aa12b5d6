"""Temporary shim."""
from alignexp.evaluate import format_table, write_eval_json  # noqa: F401
