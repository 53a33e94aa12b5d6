"""Benchmarks through lm-evaluation-harness (alignexp/evaluation/benchmarks.py, mode=benchmarks): a local
task YAML over a local JSONL file (nothing downloaded). The harness is the optional ``benchmarks`` extra:
without it the tests that run it are skipped, saying so."""

from __future__ import annotations

import json
import math
import sys

import pytest

from alignexp.errors import AlignexpError, ConfigError
from alignexp.evaluate import run
from alignexp.evaluation.benchmarks import PRESETS, BenchmarkArgs, paired, task_manager
from alignexp.report import write_report
from tests.conftest import REPO
from tests.integration.test_evaluate import compose_evaluate, models, saved_models  # noqa: F401 (fixtures)

LOCAL = ("mode=benchmarks", f"benchmarks.include_path={REPO / 'tests' / 'fixtures' / 'benchmarks'}",
         "benchmarks.builtin_tasks=false", "benchmarks.tasks=[alignexp_two_choice]", "benchmarks.batch_size=4")


def test_paired_difference_by_hand():
    """Items a, b, c, d: policy 1, 1, 0, 1; reference 0, 1, 0, 0 (item e only the policy has: left out).
    Means 0.75 and 0.25; differences 1, 0, 0, 1: mean 0.5, sample sd sqrt(1/3), stderr sqrt(1/3)/2."""
    out = paired({"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 1.0}, {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0})
    assert out["n"] == 4 and out["policy"] == 0.75 and out["reference"] == 0.25
    assert out["difference"] == 0.5 and out["difference_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert out["policy_stderr"] == pytest.approx(0.25)  # sd 0.5 over 4 items
    assert paired({"a": 1.0}, {"b": 0.0}) == {"n": 0}


def test_presets_name_each_leaderboard_version():
    assert [t for t, _, _ in PRESETS["open_llm_leaderboard_v1"]] == [
        "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"]
    assert [k for _, k, _ in PRESETS["open_llm_leaderboard_v1"]] == [25, 10, 5, 0, 5, 5]
    assert len(PRESETS["open_llm_leaderboard_v2"]) == 6
    assert BenchmarkArgs(preset="open_llm_leaderboard_v1", num_fewshot=0).plan()[0] == \
        ("arc_challenge", 0, "acc_norm,none")
    with pytest.raises(ConfigError, match="benchmarks.preset must be one of"):
        BenchmarkArgs(preset="leaderboard_2022")
    with pytest.raises(ConfigError, match="benchmarks.tasks: mode=benchmarks needs"):
        BenchmarkArgs().plan()


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(AlignexpError, match=r"lm-evaluation-harness: pip install -e '\.\[benchmarks\]'"):
        task_manager(BenchmarkArgs(tasks=["x"]))


def test_mode_benchmarks_on_a_local_task(saved_models, tmp_path, monkeypatch):  # noqa: F811
    """The policy and its reference on a 12-item two-choice task: both scores, their paired difference
    (the mean of per-item differences, equal to the difference of the means over the same items) with
    its standard error, in eval.json and in the report's benchmarks table. An unknown task fails before
    any model loads."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the optional 'benchmarks' extra: "
                                          "pip install -e '.[benchmarks]') is not installed")
    monkeypatch.chdir(REPO)  # the task's data path is relative to the repository root
    policy = f"policy={saved_models / 'run' / 'policy'}"
    with pytest.raises(ConfigError, match="no lm-evaluation-harness task no_such_task"):
        run(compose_evaluate(tmp_path / "bad", policy, *LOCAL, "benchmarks.tasks=[no_such_task]"))
    assert not (tmp_path / "bad").exists()

    record = run(compose_evaluate(tmp_path / "out", policy, *LOCAL))
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert written["benchmarks"] == json.loads(json.dumps(record["benchmarks"]))
    assert written["loss"] == "dpo" and written["init_from"] == str(saved_models / "sft")
    task = written["benchmarks"]["tasks"]["alignexp_two_choice"]
    assert task["headline"] == "acc,none" and set(task["metrics"]) == {"acc,none", "acc_norm,none"}
    acc = task["metrics"]["acc,none"]
    assert acc["n"] == 12 and task["num_fewshot"] == [0]
    for who in ("policy", "reference"):
        assert acc[who] * 12 == pytest.approx(round(acc[who] * 12))  # a count of right answers out of 12
    assert acc["difference"] == pytest.approx(acc["policy"] - acc["reference"])
    assert acc["difference_stderr"] is not None and acc["difference_stderr"] >= 0

    report = write_report(tmp_path / "out")
    assert "## Benchmarks" in report["markdown"] and "| alignexp_two_choice | acc,none |" in report["markdown"]
    assert (tmp_path / "out" / "report" / "benchmarks.csv").read_text().count("alignexp_two_choice") == 2

    # The policy against itself: every per-item difference is 0.
    same = run(compose_evaluate(tmp_path / "same", policy, f"reference={saved_models / 'run' / 'policy'}", *LOCAL))
    same_acc = same["benchmarks"]["tasks"]["alignexp_two_choice"]["metrics"]["acc,none"]
    assert same_acc["difference"] == 0.0 and same_acc["difference_stderr"] == 0.0
    assert same_acc["policy"] == acc["policy"]
