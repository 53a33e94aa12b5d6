"""Temporary shim."""
from alignexp.evaluate import evaluate_policy  # noqa: F401
