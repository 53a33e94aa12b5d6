"""How a run meets its hardware: ``hardware=auto`` resolved (:mod:`.hardware`), the Lightning strategies and
precision (:mod:`.strategies`, :mod:`.offload`), the processes launched once (:mod:`.launch`), and the
per-GPU memory plan (:mod:`.plan`, :mod:`.plan_memory`, :mod:`.plan_stages`; ``python -m alignexp.plan``).
The collectives every stage uses are :mod:`alignexp.distributed`, below this package; the GPU check, which
runs the whole pipeline on a GPU, is :mod:`alignexp.gpu_check`, above it."""
