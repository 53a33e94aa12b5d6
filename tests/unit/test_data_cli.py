"""``python -m alignexp.data`` run as a user runs it (a subprocess), on the hand-written fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignexp.data import percentiles, render_example, summarize
from alignexp.tasks.base import LoadReport, RankedExample

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "alignexp.data", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    summary, end = json.JSONDecoder().raw_decode(result.stdout)
    return summary | {"_rendered": result.stdout[end:]}


def test_tldr_comparisons_summary(tmp_path):
    summary = summary_of(run_cli(tmp_path, "task=tldr", f"task.path={FIXTURES / 'tldr/comparisons.jsonl'}"))
    assert (summary["stage"], summary["records"], summary["examples"]) == ("preference", 10, 7)
    assert summary["responses_per_prompt"] == {"2": 6, "3": 1}
    assert summary["left_out"] == {"CNN/DM article, not a TL;DR post": 1}
    assert summary["skipped_total"] == 0 and summary["examples_with_ties"] == 0
    assert summary["prompt_chars"]["max"] == 149 and summary["response_chars"]["max"] == 60
    rendered = summary["_rendered"]
    assert rendered.count("=== example ") == 3 and "--- response 3 ---\n cat." in rendered
    assert list(tmp_path.iterdir()) == []  # no output folder, no log file


def test_bad_records_exit_nonzero_then_skip(tmp_path):
    bad = FIXTURES / "ultrafeedback/raw_bad.jsonl"
    strict = run_cli(tmp_path, "task=ultrafeedback", f"task.path={bad}")
    assert strict.returncode == 1 and strict.stdout == ""
    assert f"{bad}, record 2 (numbered from 0), field 'completions[1].response': empty text" in strict.stderr
    assert "Traceback" not in strict.stderr and "skip_invalid=true" in strict.stderr
    summary = summary_of(run_cli(tmp_path, "task=ultrafeedback", f"task.path={bad}", "task.skip_invalid=true"))
    assert (summary["records"], summary["examples"], summary["skipped_total"]) == (6, 2, 4)
    assert summary["skipped"]["instruction: missing field"] == 1
    assert summary["responses_per_prompt"] == {"2": 2}


def test_ties_stage_and_split_overrides(tmp_path):
    raw = summary_of(run_cli(tmp_path, "task=ultrafeedback", f"task.path={FIXTURES / 'ultrafeedback/raw.jsonl'}",
                             "task.rank_by=helpfulness", "n_show=1"))
    assert raw["responses_per_prompt"] == {"4": 2} and raw["examples_with_scores"] == 2
    assert (raw["examples_with_ties"], raw["tied_adjacent_pairs"]) == (1, 1)  # helpfulness 5, 4, 4, 2
    assert raw["chat_prompts"] == 2 and raw["_rendered"].count("=== example ") == 1
    assert "[user] Explain photosynthesis" in raw["_rendered"] and "(score 5)" in raw["_rendered"]
    folder = FIXTURES / "custom/folder"
    test_split = summary_of(run_cli(tmp_path, "task=custom", f"task.path={folder}", "task.split=test"))
    assert (test_split["split"], test_split["examples"]) == ("test", 1)
    evals = summary_of(run_cli(tmp_path, "task=mt", f"task.eval_path={FIXTURES / 'mt/wmt22.jsonl'}", "stage=eval"))
    assert (evals["stage"], evals["examples"], evals["examples_with_target"]) == ("eval", 2, 2)


def test_synthetic_default_summarises_sft(tmp_path):
    summary = summary_of(run_cli(tmp_path, "task.n_sft=50", "n_show=0"))
    assert (summary["task"], summary["stage"], summary["examples"]) == ("synthetic", "sft", 50)
    assert summary["responses_per_prompt"] == {"1": 50} and summary["_rendered"].strip() == ""


def test_no_local_copy_offline_and_bad_settings(tmp_path):
    offline = run_cli(tmp_path, "task=hh")
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert "cannot load the hub dataset Anthropic/hh-rlhf" in offline.stderr and "task.path=DIR" in offline.stderr
    setting = run_cli(tmp_path, "task=mt", "task.rank_by=bleu")
    assert setting.returncode == 2 and "task.rank_by" in setting.stderr and "Traceback" not in setting.stderr


@pytest.mark.parametrize("values,expected", [
    ([], {}),
    ([5], {"min": 5, "p50": 5, "p90": 5, "p99": 5, "max": 5, "mean": 5.0}),
    (list(range(1, 11)), {"min": 1, "p50": 5, "p90": 9, "p99": 10, "max": 10, "mean": 5.5}),
])
def test_percentiles_nearest_rank(values, expected):
    assert percentiles(values) == expected


def test_summary_and_rendering_in_process():
    examples = [RankedExample("p", ["a", "b", "c"], scores=[2.0, 2.0, 1.0], target="t"),
                RankedExample([{"role": "user", "content": "hi"}], ["x" * 20])]
    report = LoadReport("src", records=3, examples=2)
    report.skipped["prompt: empty text"] += 1
    summary = summarize(examples, report, "custom", "preference", "train")
    assert summary["responses_per_prompt"] == {"1": 1, "3": 1}
    assert (summary["examples_with_ties"], summary["tied_adjacent_pairs"], summary["skipped_total"]) == (1, 1, 1)
    assert summary["chat_prompts"] == 1 and summary["examples_with_target"] == 1
    text = render_example(examples[1], 2, limit=5)
    assert "[user] hi" in text and "xxxxx... [15 more chars]" in text
    assert "--- target ---\nt" in render_example(examples[0], 1, limit=50)
    assert OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/data.yaml").stage == "auto"
