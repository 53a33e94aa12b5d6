"""``python -m alignexp.report`` over smoke-sized multiruns of fake run folders (alignexp/report/): one
seed per configuration (the table, plots and CSVs), and a ``seed=0,1,2`` sweep of two losses whose
means, intervals, matched-KL values and paired differences are worked out here by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from alignexp.report import find_runs, main, swept_parameters, write_report


def fake_eval(loss: str, gold: float, kl: float, win: dict[str, float], best_of_n: bool = False) -> dict:
    """An eval.json as evaluate_policy writes it (fewer metrics, same structure)."""
    def entry(t: str, w: float) -> dict:
        scale = float(t)
        return {"policy": {"gold_reward": gold * (0.5 + scale / 2), "gold_reward_stderr": 0.01, "kl": kl * scale,
                           "kl_stderr": 0.1},
                "reference": {"gold_reward": 0.05, "gold_reward_stderr": 0.01, "kl": 0.0, "kl_stderr": 0.0},
                "comparisons": {"win_rate_vs_reference": w, "win_rate_vs_reference_stderr": 0.03, "judge": "gold",
                                "baseline": "reference_samples"}}

    by_temperature = {t: entry(t, w) for t, w in win.items()}
    head = by_temperature["1"]
    record = {"task": "synthetic", "loss": loss, "model": "tiny", "n_prompts": 128, "temperature": 1.0,
              "policy": {**head["policy"], "preference_accuracy": 0.7, "preference_accuracy_stderr": 0.02,
                         "response_tokens": 12.0, "response_tokens_stderr": 0.3},
              "reference": head["reference"], "comparisons": head["comparisons"], "by_temperature": by_temperature,
              "init_from": "/cache/sft/synthetic-tiny"}
    if best_of_n:
        record["best_of_n"] = [{"n": n, "kl": math.log(n) - (n - 1) / n, "gold_reward": 0.1 + 0.05 * k,
                                "gold_reward_stderr": 0.01} for k, n in enumerate((2, 4, 16))]
    return record


def make_run(folder: Path, loss: str, beta: float, gold: float, kl: float, win: dict[str, float],
             ranking_length: int | None = None, best_of_n: bool = False, sampler: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(fake_eval(loss, gold, kl, win, best_of_n)))
    config = {"seed": 0, "pairs": "best_worst", "loss": {"name": loss, "beta": beta},
              "task": {"name": "synthetic", "ranking_length": ranking_length, "n_eval_prompts": 128},
              "sampler": sampler or {"name": "offline"}, "paths": {"output_dir": str(folder)}, "eval": {"temperatures": [1.0]}}
    if loss == "dpo":
        config["loss"]["label_smoothing"] = 0.0
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss={loss}", f"loss.beta={beta}",
                                                                      f"paths.output_dir={folder}"]))
    return folder


@pytest.fixture
def multirun(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    make_run(root / "0_loss.beta=0.1,loss=dpo", "dpo", 0.1, 0.6, 8.0, {"0": 0.7, "0.5": 0.9, "1": 0.95},
             best_of_n=True)
    make_run(root / "1_loss.beta=0.5,loss=dpo", "dpo", 0.5, 0.4, 3.0, {"0": 0.6, "0.5": 0.8, "1": 0.85})
    make_run(root / "2_loss.beta=0.1,loss=ipo", "ipo", 0.1, 0.3, 1.5, {"0": 0.55, "0.5": 0.7, "1": 0.75},
             ranking_length=4)
    # best-of-N: nothing trained (policy = SFT, KL 0); its eval.json holds best-of-2/4/16, the run is N = 4
    make_run(root / "3_sampler=best_of_n", "dpo", 0.1, 0.1, 0.0, {"1": 0.6}, best_of_n=True,
             sampler={"name": "best_of_n", "n": 4})
    return root


def test_report_over_a_multirun(multirun, tmp_path):
    out = tmp_path / "report"
    written = write_report(multirun, out)
    assert written["runs"] == 4
    names = {p.name for p in written["files"]}
    assert {"results.md", "results.csv", "runs.csv", "comparisons.csv", "matched_kl.csv", "frontier.png",
            "win_rate_vs_temperature.png", "metrics_vs_loss_beta.png"} <= names
    for path in written["files"]:
        assert path.exists() and path.stat().st_size > 0
    # every PNG parses as an image of a sensible size
    import matplotlib.image

    for path in out.glob("*.png"):
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    # runs.csv: one row per run, the swept parameter and the metrics with their stderr columns
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["run"] for r in rows] == ["0_loss.beta=0.1,loss=dpo", "1_loss.beta=0.5,loss=dpo",
                                        "2_loss.beta=0.1,loss=ipo", "3_sampler=best_of_n"]
    assert [r["method"] for r in rows] == ["dpo", "dpo", "ipo", "best_of_n"]
    assert [float(r["loss.beta"]) for r in rows] == [0.1, 0.5, 0.1, 0.1]
    assert [r["seed"] for r in rows] == ["0"] * 4
    # the best-of-N run reports its best-of-4: gold 0.15 at the analytic KL log 4 - 3/4
    assert float(rows[3]["gold_reward"]) == pytest.approx(0.15)
    assert float(rows[3]["kl"]) == pytest.approx(math.log(4) - 0.75) and rows[3]["kl_stderr"] == ""
    assert float(rows[0]["gold_reward"]) == pytest.approx(0.6) and float(rows[0]["win_rate"]) == 0.95
    assert float(rows[2]["kl_stderr"]) == pytest.approx(0.1)
    assert "preference_accuracy" in rows[0] and "bleu" not in rows[0]  # only metrics some run has
    # results.csv: one row per configuration; one seed each, so the run's own stderr and no interval
    points = list(csv.DictReader((out / "results.csv").open()))
    assert [(p["method"], p["loss.beta"], p["n_seeds"]) for p in points] == [
        ("best_of_n", "0.1", "1"), ("dpo", "0.1", "1"), ("dpo", "0.5", "1"), ("ipo", "0.1", "1")]
    assert float(points[1]["gold_reward"]) == 0.6 and float(points[1]["gold_reward_stderr"]) == 0.01
    assert points[1]["gold_reward_ci_low"] == ""
    # Markdown: every run appears, Hydra job folders by their number
    markdown = (out / "results.md").read_text()
    runs_section = markdown[markdown.index("## Runs"):].strip().splitlines()
    assert runs_section[4].startswith("| run | method | task | seed | loss.beta | task.ranking_length |")
    assert len(runs_section) == 4 + 2 + 4
    for number, method in (("#0", "dpo"), ("#1", "dpo"), ("#2", "ipo"), ("#3", "best_of_n")):
        assert any(line.startswith(f"| {number} | {method} |") for line in runs_section)
    assert "| dpo | synthetic | 0.1 | - | 0 | 0.600 ± 0.010 | 8.000 ± 0.100 |" in markdown
    # dpo's frontier through (3, 0.4) and (8, 0.6) at the default KL points 4.2, 5.5, 6.8 (1/4, 1/2, 3/4 of
    # the way, two digits): 0.4 + 0.2 * 1.2/5 = 0.448, 0.5, 0.552; the others have one KL: no range
    assert written["kls"] == [4.2, 5.5, 6.8]
    assert "| dpo | synthetic | 0 | 3.00 to 8.00 | 0.448 | 0.500 | 0.552 |" in markdown
    assert "| ipo | synthetic | 0 | one KL per seed | - | - | - |" in markdown
    assert "fewer than two seeds in common, so no paired test, for best_of_n - dpo, ipo - dpo" in markdown


def test_swept_parameters_ignore_paths_and_a_method_s_own_constant_keys(multirun):
    runs = find_runs(multirun)
    # loss.label_smoothing exists only for dpo and never varies; paths and the loss name are not "swept";
    # task.ranking_length is set for one run only (null elsewhere), so it varies.
    assert swept_parameters(runs) == ["loss.beta", "task.ranking_length"]
    assert [r.method for r in runs] == ["dpo", "dpo", "ipo", "best_of_n"]
    assert swept_parameters(runs[:1]) == ["loss.beta"]  # one run: its own overrides


def test_report_cli(multirun, capsys):
    assert main([str(multirun)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs; swept: loss, sampler, loss.beta, task.ranking_length" in printed
    assert (multirun / "report" / "results.md").exists()
    assert find_runs(multirun)[0].name == "0_loss.beta=0.1,loss=dpo"  # the report folder is no run


def test_report_errors_name_the_file(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no eval.json at or below this folder" in capsys.readouterr().err
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "eval.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    assert f"{bad / 'eval.json'}: not valid JSON" in capsys.readouterr().err


def test_a_run_named_by_an_experiment_is_its_own_method(tmp_path):
    from alignexp.report.runs import Run

    rso = Run(tmp_path, "0", {"loss": "dpo"}, {"run_name": "rso", "loss.name": "dpo", "sampler.name": "rso"})
    plain = Run(tmp_path, "1", {"loss": "dpo"}, {"run_name": "dpo", "loss.name": "dpo", "sampler.name": "offline"})
    arm = Run(tmp_path, "2", {"loss": "dpo"}, {"run_name": "dpo_128_prompts", "loss.name": "dpo"})
    assert (rso.method, plain.method, arm.method) == ("rso", "dpo", "dpo_128_prompts")
