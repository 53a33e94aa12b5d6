"""KTO trains end to end on binary feedback: TRL's unpaired format from a file (task=custom), and the synthetic
task's samples judged alone by a gold-reward threshold. (From rankings, binary=best: loss=kto of
test_configs.py's every-loss test, on the synthetic task's rankings.)"""

from __future__ import annotations

import json
from pathlib import Path

from alignexp.train import run
from tests.conftest import REPO, TINY_RUN

BINARY = REPO / "tests" / "fixtures" / "custom" / "binary.jsonl"


def test_kto_trains_on_trl_unpaired_feedback_from_a_file(compose):
    cfg = compose("task=custom", "loss=kto", f"task.path={BINARY}", f"task.eval_path={BINARY}",
                  "task.eval_split=train", *TINY_RUN, "eval.max_new_tokens=8")
    record = run(cfg)
    assert record["loss"] == "kto" and record["n_prompts"] == 3  # the desirable completions' prompts
    metrics = (Path(cfg.paths.output_dir) / "logs").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0]
    assert "train/kl" in header and "train/rewards/chosen" in header


def test_kto_trains_on_single_samples_labelled_by_the_gold_reward(compose):
    cfg = compose("loss=kto", "task.binary_threshold=0.0", *TINY_RUN)
    record = run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "eval.json").read_text())
    assert record["loss"] == "kto" and "gold_reward" in saved["policy"]
