"""Evaluation (temporary shim while the package is being split out of alignexp/evaluate.py)."""
