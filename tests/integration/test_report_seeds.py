"""``python -m alignexp.report`` on a ``-m loss=dpo,ranked_dpo loss.beta=0.1,0.5 seed=0,1,2`` sweep whose
run folders are shaped like real runs (eval.json, config.yaml, .hydra/{config,overrides}.yaml): every
mean, t-interval, matched-KL value and paired difference it prints is worked out here by hand, with the
standard library and the tabled t quantile, not with alignexp's statistics.

The sweep (gold reward, KL) per seed 0, 1, 2:
    dpo        beta 0.1: (0.50, 6.0) (0.54, 6.4) (0.52, 5.6)    beta 0.5: (0.30, 2.0) (0.34, 2.2) (0.29, 1.8)
    ranked_dpo beta 0.1: (0.56, 6.2) (0.61, 6.6) (0.57, 6.0)    beta 0.5: (0.35, 2.1) (0.37, 2.35) (0.36, 1.9)
Win rates: 0.9 (beta 0.1) or 0.7 (beta 0.5) + 0.01 * seed, + 0.02 + 0.005 * seed for ranked_dpo.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from alignexp.report import main, write_report
from alignexp.report import plots as report_plots

T975_2 = 4.302653  # Student t, 97.5% quantile on 2 df (tables; = 0.95 sqrt(2 / (1 - 0.95^2)))
SEEDS = (0, 1, 2)
SWEEP = {  # (loss, beta): [(gold reward, KL) for seed 0, 1, 2]
    ("dpo", 0.1): [(0.50, 6.0), (0.54, 6.4), (0.52, 5.6)],
    ("dpo", 0.5): [(0.30, 2.0), (0.34, 2.2), (0.29, 1.8)],
    ("ranked_dpo", 0.1): [(0.56, 6.2), (0.61, 6.6), (0.57, 6.0)],
    ("ranked_dpo", 0.5): [(0.35, 2.1), (0.37, 2.35), (0.36, 1.9)],
}
WIN = {0.1: 0.9, 0.5: 0.7}


def real_config(loss: str, beta: float, seed: int, folder: Path) -> dict:
    """A config.yaml as train.py writes it (the default experiment's groups, trimmed of nothing the report reads)."""
    hparams = {"name": loss, "beta": beta, **({"label_smoothing": 0.0} if loss == "dpo" else {"sft_weight": 0.0})}
    return {"model": {"name": "tiny", "path": None, "init_seed": 0, "dtype": "float32", "lora": None},
            "task": {"_target_": "alignexp.tasks.synthetic.SyntheticTask", "name": "synthetic", "seed": 0,
                     "n_train_prompts": 512, "n_eval_prompts": 128, "n_responses": 4, "tau": 0.05,
                     "ranking_length": None, "skip_invalid": False},
            "sampler": {"name": "offline"}, "loss": hparams,
            "hardware": {"name": "cpu", "accelerator": "cpu", "devices": 1, "precision": "32-true", "threads": 1},
            "eval": {"enabled": True, "temperatures": [0.0, 0.5, 1.0], "max_new_tokens": 32, "seed": 1234},
            "logger": {"csv": True, "wandb": False}, "seed": seed, "pairs": "best_worst", "init_from": None,
            "train": {"batch_size": 16, "lr": 0.0001, "max_epochs": 2, "reference": "precompute"},
            "sft": {"batch_size": 64, "lr": 0.003, "max_epochs": 3},
            "paths": {"output_dir": str(folder), "cache_dir": "/cache"}}


def real_eval(loss: str, beta: float, gold: float, kl: float, seed: int) -> dict:
    """An eval.json as evaluate_policy writes it for the synthetic task (the same keys, fewer metrics)."""
    def section(g: float, k: float) -> dict:
        return {"gold_reward": g, "gold_reward_stderr": 0.012, "response_tokens": 14.7,
                "response_tokens_stderr": 0.26, "kl": k, "kl_stderr": 0.21}

    reference = {"gold_reward": 0.066, "gold_reward_stderr": 0.021, "kl": 0.0, "kl_stderr": 0.0}
    win = WIN[beta] + 0.01 * seed + (0.02 + 0.005 * seed if loss == "ranked_dpo" else 0.0)

    def comparisons(w: float) -> dict:
        return {"win_rate_vs_reference": w, "win_rate_vs_reference_stderr": 0.03, "win_rate_vs_reference_n": 128,
                "judge": "gold", "baseline": "reference_samples"}

    return {"task": "synthetic", "loss": loss, "model": "tiny", "n_prompts": 128, "temperature": 1.0,
            "policy": {**section(gold, kl), "preference_accuracy": 0.8 + 0.01 * seed,
                       "preference_accuracy_stderr": 0.014, "preference_accuracy_n_pairs": 768},
            "reference": reference, "comparisons": comparisons(win),
            "by_temperature": {t: {"policy": section(gold, kl), "reference": reference,
                                   "comparisons": comparisons(win - 0.1 * (1 - float(t)))} for t in ("0", "0.5", "1")},
            "eval_seconds": {"total": 3.1}, "hparams": {"beta": beta},
            "init_from": "/cache/sft/synthetic-tiny-ce194d0d0de7"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Hydra's multirun layout: <sweep>/<job number>/ for loss x beta x seed, in Hydra's order."""
    root = tmp_path_factory.mktemp("multirun") / "2026-01-01_00-00-00"
    job = 0
    for (loss, beta), values in SWEEP.items():
        for seed, (gold, kl) in zip(SEEDS, values):
            folder = root / str(job)
            (folder / ".hydra").mkdir(parents=True)
            config = real_config(loss, beta, seed, folder)
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
            (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
            (folder / ".hydra" / "overrides.yaml").write_text(
                yaml.safe_dump([f"loss={loss}", f"loss.beta={beta}", f"seed={seed}"]))
            (folder / "eval.json").write_text(json.dumps(real_eval(loss, beta, gold, kl, seed)))
            job += 1
    (root / "jobs.jsonl").write_text("")
    return root


def by_hand(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of three values: mean ± 4.302653 s / sqrt 3."""
    mean, half = statistics.mean(values), T975_2 * statistics.stdev(values) / math.sqrt(3)
    return mean, mean - half, mean + half


def cell(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def lerp(a: tuple[float, float], b: tuple[float, float], kl: float) -> float:
    """Gold reward at ``kl`` on the segment between the runs a = (gold, KL) and b."""
    return a[0] + (b[0] - a[0]) * (kl - a[1]) / (b[1] - a[1])


def at_kl(loss: str, kl: float) -> list[float]:
    """Each seed's gold reward at ``kl`` on the segment between its beta = 0.5 and beta = 0.1 runs."""
    return [lerp(low, high, kl) for low, high in zip(SWEEP[(loss, 0.5)], SWEEP[(loss, 0.1)])]


def paired_by_hand(first: list[float], second: list[float]) -> tuple[float, float, float, float]:
    """Paired t-test on 2 df: mean difference, its interval, and p = 1 - |t| / sqrt(2 + t^2)."""
    d = [a - b for a, b in zip(first, second)]
    mean, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(3)
    t = mean / se
    return mean, mean - T975_2 * se, mean + T975_2 * se, 1 - abs(t) / math.sqrt(2 + t * t)


def test_seeds_are_replicates_with_t_intervals(sweep, tmp_path, capsys):
    """12 runs make 4 configurations of 3 seeds; ``seed`` is no swept column. E.g. dpo beta 0.1:
    gold (0.50, 0.54, 0.52): mean 0.52, s = 0.02, half-width 4.302653 * 0.02 / sqrt 3 = 0.049683."""
    assert main([str(sweep), "--out", str(tmp_path), "--kl", "2", "3", "4", "6"]) == 0
    printed = capsys.readouterr().out
    assert "12 runs in 4 configurations; methods: dpo, ranked_dpo; seeds: 0 1 2; swept: loss, seed, loss.beta." in printed
    assert "| method | task | loss.beta | seeds | gold_reward | kl | win_rate | preference_accuracy |" in printed
    assert cell(*by_hand([0.50, 0.54, 0.52])) == "0.520 [0.470, 0.570]"
    for (loss, beta), values in SWEEP.items():
        gold, kl = by_hand([g for g, _ in values]), by_hand([k for _, k in values])
        win = by_hand([WIN[beta] + 0.01 * s + (0.02 + 0.005 * s if loss == "ranked_dpo" else 0.0) for s in SEEDS])
        row = f"| {loss} | synthetic | {beta} | 0 1 2 | {cell(*gold)} | {cell(*kl)} | {cell(*win)} |"
        assert row in printed, row
    points = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(p["method"], p["loss.beta"], p["n_seeds"], p["seeds"]) for p in points] == [
        ("dpo", "0.1", "3", "0 1 2"), ("dpo", "0.5", "3", "0 1 2"),
        ("ranked_dpo", "0.1", "3", "0 1 2"), ("ranked_dpo", "0.5", "3", "0 1 2")]
    mean, low, high = by_hand([0.56, 0.61, 0.57])
    gold = [float(points[2][k]) for k in ("gold_reward", "gold_reward_ci_low", "gold_reward_ci_high")]
    assert gold == pytest.approx([mean, low, high], abs=1e-6)
    assert "seed" not in points[0] and not (tmp_path / "metrics_vs_seed.png").exists()
    runs = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["run"] for r in runs] == [str(job) for job in range(12)]  # Hydra's job numbers in numeric order
    assert [r["seed"] for r in runs] == ["0", "1", "2"] * 4
    assert (tmp_path / "metrics_vs_loss_beta.png").exists()


def test_gold_reward_at_matched_kl_is_interpolated_never_extrapolated(sweep, tmp_path, capsys):
    """dpo's seeds cover KL 2.2 to 5.6 together (max of the lows 2.0, 2.2, 1.8; min of the highs 6.0, 6.4, 5.6),
    ranked_dpo's 2.35 to 6.0. At KL 4, dpo: seed 0 0.30 + 0.20 * 2/4 = 0.400, seed 1 0.34 + 0.20 * 1.8/4.2
    = 0.425714, seed 2 0.29 + 0.23 * 2.2/3.8 = 0.423158. KL 2 lies below both ranges and KL 6 above dpo's:
    "-" there, ranked_dpo's value at 6 (inside its range) is given."""
    assert main([str(sweep), "--out", str(tmp_path), "--kl", "2", "3", "4", "6"]) == 0
    printed = capsys.readouterr().out
    assert at_kl("dpo", 4.0) == pytest.approx([0.4, 0.425714, 0.423158], abs=1e-6)
    dpo = [cell(*by_hand(at_kl("dpo", kl))) for kl in (3.0, 4.0)]
    ranked = [cell(*by_hand(at_kl("ranked_dpo", kl))) for kl in (3.0, 4.0, 6.0)]
    assert f"| dpo | synthetic | 0 1 2 | 2.20 to 5.60 | - | {dpo[0]} | {dpo[1]} | - |" in printed
    assert f"| ranked_dpo | synthetic | 0 1 2 | 2.35 to 6.00 | - | {ranked[0]} | {ranked[1]} | {ranked[2]} |" in printed
    rows = list(csv.DictReader((tmp_path / "matched_kl.csv").open()))
    row = next(r for r in rows if r["method"] == "dpo" and float(r["kl"]) == 4.0)
    assert [float(row[k]) for k in ("gold_reward", "ci_low", "ci_high")] == pytest.approx(by_hand(at_kl("dpo", 4.0)), abs=1e-6)
    assert (float(row["kl_low"]), float(row["kl_high"])) == (2.2, 5.6)
    assert next(r for r in rows if r["method"] == "dpo" and float(r["kl"]) == 6.0)["gold_reward"] == ""


def test_paired_differences_over_seeds(sweep, tmp_path, capsys):
    """ranked_dpo - dpo (dpo is the default baseline), paired by seed. At beta 0.1, gold:
    d = (0.06, 0.07, 0.05), mean 0.06, s_d = 0.01, t = 0.06 / (0.01 / sqrt 3) = 10.392305,
    p = 1 - t / sqrt(2 + t^2) = 0.009133. At matched KL 4 the per-seed differences come from the two
    frontiers; KL 6 lies outside dpo's range, so there is no comparison there."""
    assert main([str(sweep), "--out", str(tmp_path), "--kl", "2", "3", "4", "6"]) == 0
    printed = capsys.readouterr().out
    mean, low, high, p = paired_by_hand([0.56, 0.61, 0.57], [0.50, 0.54, 0.52])
    assert p == pytest.approx(0.009133, abs=1e-6)
    assert f"| ranked_dpo - dpo | synthetic | gold_reward | beta=0.1 | {cell(mean, low, high)} | {p:.3f} | 0 1 2 |" in printed
    for kl in (3.0, 4.0):
        mean, low, high, p = paired_by_hand(at_kl("ranked_dpo", kl), at_kl("dpo", kl))
        line = f"| ranked_dpo - dpo | synthetic | gold_reward at KL {kl:g} | matched KL | {cell(mean, low, high)} | {p:.3f} | 0 1 2 |"
        assert line in printed, line
    assert "gold_reward at KL 6" not in printed and "gold_reward at KL 2 " not in printed
    rows = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    row = next(r for r in rows if r["quantity"] == "gold_reward at KL 4")
    expected = paired_by_hand(at_kl("ranked_dpo", 4.0), at_kl("dpo", 4.0))
    assert [float(row[k]) for k in ("difference", "ci_low", "ci_high", "p_value")] == pytest.approx(expected, abs=1e-6)
    assert (row["test"], row["df"], row["seeds"]) == ("paired t-test", "2", "0 1 2")
    # the reverse pair, named on the command line, flips the sign and keeps the p-value
    assert main([str(sweep), "--out", str(tmp_path), "--kl", "4", "--compare", "dpo:ranked_dpo"]) == 0
    rows = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    row = next(r for r in rows if r["quantity"] == "gold_reward at KL 4")
    assert float(row["difference"]) == pytest.approx(-expected[0]) and float(row["p_value"]) == pytest.approx(expected[3])


def test_default_kl_points_and_frontier_band(sweep, tmp_path, monkeypatch):
    """Without --kl: three points across the range both methods cover, [2.35, 5.6] -> 3.1625, 3.975, 4.7875,
    to two digits 3.2, 4, 4.8. The frontier plot draws each method's mean curve with its bootstrap band
    (a filled area) and error bars equal to the t-intervals' half-widths."""
    drawn = {}

    def capture(fig, ax, path, legend_size):
        drawn[Path(path).name] = ax
        return original(fig, ax, path, legend_size)

    original = report_plots._finish
    monkeypatch.setattr(report_plots, "_finish", capture)
    written = write_report(sweep, tmp_path)
    assert written["kls"] == [3.2, 4.0, 4.8]
    fronts = {f.method: f for f in written["frontiers"]}
    grid, mean, low, high = fronts["dpo"].band()
    assert (grid[0], grid[-1]) == (2.2, 5.6)
    assert all(lo <= m <= hi for lo, m, hi in zip(low, mean, high)) and any(hi > lo for lo, hi in zip(low, high))
    assert mean[-1] == pytest.approx(statistics.mean(at_kl("dpo", 5.6)))
    ax = drawn["frontier.png"]
    from matplotlib.collections import PolyCollection

    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one band per method
    # dpo beta 0.1's gold reward bar: from the t-interval's low to its high
    _, low_, high_ = by_hand([0.50, 0.54, 0.52])
    spans = [tuple(sorted(seg[:, 1])) for c in ax.collections if hasattr(c, "get_segments") and not isinstance(c, PolyCollection)
             for seg in c.get_segments() if len(seg) == 2 and seg[0][0] == seg[1][0]]
    assert any(s == pytest.approx((low_, high_), abs=1e-6) for s in spans)


def test_comparison_options_are_checked(sweep, tmp_path, capsys):
    assert main([str(sweep), "--out", str(tmp_path), "--compare", "dpo:pro"]) == 2
    assert "--compare: no method 'pro' among the runs; methods: dpo, ranked_dpo" in capsys.readouterr().err
    assert main([str(sweep), "--out", str(tmp_path), "--compare", "dpo"]) == 2
    assert "expected METHOD:METHOD" in capsys.readouterr().err
    assert main([str(sweep), "--out", str(tmp_path), "--baseline", "ipo"]) == 2
    assert "--baseline: no method 'ipo'" in capsys.readouterr().err
    assert main([str(sweep), "--out", str(tmp_path), "--kl", "-1"]) == 2
    assert "KL values must be >= 0" in capsys.readouterr().err


def test_plot_labels_name_only_what_tells_a_methods_points_apart():
    """A folder where PPO sweeps ppo.steps and DPO train.max_steps: both are swept parameters of the folder, but
    DPO's points all hold ppo.steps at its default (60) and PPO's train.max_steps at 1, so each method's labels
    name only its own budget; a method with one point has no label (the legend names it)."""
    from alignexp.report.aggregate import Point

    def point(method, **params):
        return Point(method, "imdb", {"ppo.steps": 60, "train.max_steps": 1, "loss.beta": 0.1, **params})

    points = [point("dpo", **{"train.max_steps": 4}), point("dpo", **{"train.max_steps": 8}),
              point("ppo", **{"ppo.steps": 2}), point("ppo", **{"ppo.steps": 4}), point("sft")]
    params = ["ppo.steps", "train.max_steps", "loss.beta"]
    varied = report_plots.varied_params(points, params)
    assert varied == {"dpo": ["train.max_steps"], "ppo": ["ppo.steps"], "sft": []}
    assert [p.describe(varied[p.method]) for p in points[:4]] == ["max_steps=4", "max_steps=8", "steps=2", "steps=4"]
