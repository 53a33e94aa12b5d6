"""What ``python -m alignexp.train debug=fast`` prints, read as a person reads it: each line once, none of
the libraries' notices, advertisements, deprecations or progress bars (alignexp/logs.py), the training
progress bar titled with its stage and without ``v_num``, and the result table in train.log too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# What the libraries printed before alignexp/logs.py filtered it, each a pattern of one known line.
NOISE = (
    r"litlogger", r"💡 Tip", r"GPU available:", r"TPU available:", r"`Trainer.fit` stopped",
    r"You defined a `validation_step`", r"is deprecated", r"DeprecationWarning", r"FutureWarning",
    r"Setting accelerator to CPU", r"\[absl\]", r"Using default tokenizer", r"Writing model shards",
    r"Loading weights", r"v_num", r"smaller than the logging interval", r"^INFO: ",
)
PREFIX = re.compile(r"^\[[^\]]+\]\[[^\]]+\]\[[A-Z]+\] - ")  # Hydra's "[time][logger][LEVEL] - "


def test_a_debug_run_prints_each_line_once_and_no_library_noise(tmp_path):
    env = {**os.environ, "ALIGNEXP_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "COLUMNS": "120"}
    env.pop("DS_ACCELERATOR", None)
    done = subprocess.run([sys.executable, "-m", "alignexp.train", "debug=fast", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = (done.stdout + done.stderr).splitlines()
    for pattern in NOISE:
        found = [line for line in output if re.search(pattern, line)]
        assert not found, f"noise {pattern!r} printed: {found[:3]}"
    messages = [PREFIX.sub("", line).strip() for line in output]
    messages = [m for m in messages if m and not set(m) <= set("━─╸ ")]
    repeated = sorted({m for m in messages if messages.count(m) > 1})
    assert not repeated, f"printed more than once: {repeated}"
    assert any(re.match(r"train · Epoch 0", m) for m in messages)  # the bar names its stage
    log = (tmp_path / "run" / "train.log").read_text()
    assert "gold reward" in log and "win rate vs reference" in log  # the result table is in the log too
    assert not any(re.search(p, log) for p in (r"litlogger", r"GPU available:"))
