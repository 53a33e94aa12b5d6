"""``python -m alignexp.plan``: the per-GPU memory plan of a run (:mod:`alignexp.scale.plan`)."""

from alignexp.scale.plan import main

if __name__ == "__main__":
    main()
