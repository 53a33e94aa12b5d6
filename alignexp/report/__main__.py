"""``python -m alignexp.report``: see :mod:`alignexp.report.cli`."""

import sys

from alignexp.report.cli import main

sys.exit(main())
