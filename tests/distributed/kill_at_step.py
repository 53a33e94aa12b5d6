"""``python tests/distributed/kill_at_step.py <step> <overrides>``: ``python -m alignexp.train <overrides>``
that kills itself with SIGKILL at the end of optimizer step ``<step>`` of its ``train`` stage (no cleanup,
nothing flushed: as a node failure or the OOM killer would)."""

import os
import signal
import sys
from pathlib import Path

import alignexp.pipeline.fit as fit

STEP = int(sys.argv.pop(1))
record_position = fit.DataPosition.on_train_batch_end


def on_train_batch_end(self, trainer, *args) -> None:
    record_position(self, trainer, *args)
    if Path(trainer.default_root_dir).name == "train" and trainer.global_step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)


fit.DataPosition.on_train_batch_end = on_train_batch_end

if __name__ == "__main__":
    from alignexp.train import main

    main()
