"""The GPU check (``python -m alignexp.gpu_check``, ``make gpu-check``): a short run of everything that only a
GPU shows (:mod:`.check`), its ZeRO-3 end-to-end and parity parts (:mod:`.zero3`), and what it needs on a
fresh GPU node (:mod:`.requirements`, ``make gpu-setup``). Importing this package imports nothing but the
standard library, so the check can name what is missing before it imports anything else."""


def main(argv: list[str] | None = None) -> None:
    """``python -m alignexp.gpu_check``: :func:`alignexp.gpu_check.check.main` (imported when called)."""
    from alignexp.gpu_check.check import main as check

    check(argv)
