"""Tables and plots from runs and sweeps, with statistics over seeds: ``python -m alignexp.report FOLDER``
(see :mod:`alignexp.report.cli`). runs: finding and reading runs; aggregate: points, frontiers,
comparisons; tables and plots: the outputs."""

from alignexp.report.cli import main, write_report
from alignexp.report.runs import find_runs, swept_parameters

__all__ = ["find_runs", "main", "swept_parameters", "write_report"]
