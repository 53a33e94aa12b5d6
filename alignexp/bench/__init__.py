"""Benchmarks, each printing a ratio against a baseline measured in the same run (``python -m alignexp.bench``):
the preference step beside TRL's DPOTrainer (:mod:`.preference`), the log-prob memory at a 32k vocabulary with
the output head chunked and in one piece, and generation beside transformers' ``generate``
(:mod:`.generation`). What each row measures, and the figures: docs/benchmark.md."""


def main(argv: list[str] | None = None) -> dict:
    """``python -m alignexp.bench`` (:func:`alignexp.bench.cli.main`)."""
    from alignexp.bench.cli import main as run

    return run(argv)
