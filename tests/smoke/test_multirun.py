"""A reduced version of the README's sweep runs as a Hydra multirun, one folder and eval.json per run."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, TINY_RUN


def test_multirun_over_losses_betas_and_ranking_length(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "alignexp.train", "-m", "loss=dpo,rrhf", "loss.beta=0.1,0.5",
               "task.ranking_length=2,4", *TINY_RUN, "train.max_steps=1", f"paths.cache_dir={cache_dir}",
               f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/eval.json"))]
    assert len(records) == 8
    assert sorted({r["loss"] for r in records}) == ["dpo", "rrhf"]
    assert sorted(r["hparams"]["beta"] for r in records if r["loss"] == "dpo") == [0.1, 0.1, 0.5, 0.5]
    assert all("beta" not in r["hparams"] for r in records if r["loss"] == "rrhf")
    assert "loss.beta does not apply to loss 'rrhf': ignored" in result.stderr + result.stdout

    # A rerun of the same sweep skips the jobs jobs.jsonl records as completed; a job whose run folder lost
    # its eval.json runs again.
    (sweep / "3" / "eval.json").unlink()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("this sweep job completed before") == 7
    assert (sweep / "3" / "eval.json").exists()
