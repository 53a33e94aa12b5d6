"""``python -m alignexp.gpu_check``: see :mod:`alignexp.gpu_check.check`."""

from alignexp.gpu_check import main

if __name__ == "__main__":
    main()
