"""``python -m alignexp.bench``: runs :func:`alignexp.bench.cli.main`."""

from alignexp.bench.cli import main

main()
