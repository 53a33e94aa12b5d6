"""Sweep progress (alignexp/sweeps.py): the size of a multirun from its config, and the jobs finished so far."""

from __future__ import annotations

import json
import subprocess
import sys

from omegaconf import OmegaConf

from alignexp.sweeps import TOTAL_FILE, sweep_progress, sweep_size, watch


def _config(task: list[str], params: dict | None = None, n_trials: int | None = None):
    sweeper = {"params": params} if n_trials is None else {"n_trials": n_trials}
    return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})


def test_sweep_size_is_the_product_of_the_sweep_overrides():
    assert sweep_size(_config(["loss=dpo,ipo", "seed=range(3)", "train.lr=1e-4"])) == 6
    # the command line's value of a key replaces the sweeper's params for it
    assert sweep_size(_config(["seed=0,1"], params={"seed": "0,1,2,3", "loss.beta": "0.1,0.2"})) == 4
    assert sweep_size(_config([], n_trials=12)) == 12  # Optuna: its trials
    assert sweep_size(_config(["+x=glob(*)"])) is None  # not known before the sweep


def test_sweep_progress_counts_each_job_once_and_skips_a_torn_line(tmp_path):
    assert sweep_progress(tmp_path) == (0, None)
    lines = [{"num": 0, "status": "COMPLETED"}, {"num": 1, "status": "FAILED"}, {"num": 0, "status": "COMPLETED"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"num": 2, "sta')
    (tmp_path / TOTAL_FILE).write_text("5\n")
    assert sweep_progress(tmp_path) == (2, 5)


def test_watch_prints_progress_and_returns_the_exit_code(tmp_path, capsys):
    (tmp_path / TOTAL_FILE).write_text("2\n")
    writer = (f"import json, time\nfor i in range(2):\n    time.sleep(0.5)\n"
              f"    open({str(tmp_path / 'jobs.jsonl')!r}, 'a').write(json.dumps({{'num': i}}) + '\\n')\n"
              f"raise SystemExit(3)\n")
    code = watch(subprocess.Popen([sys.executable, "-c", writer]), tmp_path, "[test] arm", every_s=0.1)
    assert code == 3
    out = capsys.readouterr().out
    assert "[test] arm: 2 of 2 jobs finished" in out and out.index("1 of 2") < out.index("2 of 2")
