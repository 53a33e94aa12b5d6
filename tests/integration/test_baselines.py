"""Prompting baselines beside a trained policy, from the README's commands (mode=prompting and the report):
a zero-shot and a 2-shot baseline of the tiny model on the synthetic task, a DPO run, and the report over
the three."""

from __future__ import annotations

import csv
import json
import re
import shlex

import pytest

from alignexp.args import ModelArgs
from alignexp.config import CONF_DIR, validate
from alignexp.errors import ConfigError
from alignexp.evaluate import run as evaluate
from alignexp.evaluation.prompting import PromptingArgs, evaluate_prompting
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.report import write_report
from alignexp.train import run as train
from tests.conftest import REPO
from tests.integration.test_evaluate import ARCH, LengthJudge, args, small_task, tldr_task


def readme_block(title: str) -> list[str]:
    """The commands of the README's bash block that follows ``title``."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(title):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("python -m")]


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def test_prompting_baselines_appear_in_a_report_beside_a_trained_policy(tmp_path, cache_dir):
    commands = readme_block("**Prompting baselines**")
    assert [c.split()[2] for c in commands] == ["alignexp.train", "alignexp.evaluate", "alignexp.evaluate",
                                                "alignexp.report"]
    root = tmp_path / "outputs" / "baselines"
    sft = None
    for command in commands[:3]:
        args = shlex.split(command)
        module = args[2]
        overrides = [a for a in args[3:] if not a.startswith("hydra.run.dir=")]
        folder = root / next(a for a in args if a.startswith("hydra.run.dir=")).rsplit("/", 1)[1]
        overrides = [a.replace("<sft>", str(sft)) for a in overrides]
        paths = [f"paths.output_dir={folder}", f"paths.cache_dir={cache_dir}", "hardware.threads=1"]
        if module == "alignexp.train":
            cfg = compose("train", [*paths, *overrides, "eval.progress=false"])
            validate(cfg)
            sft = train(cfg)["init_from"]
        else:
            evaluate(compose("evaluate", [*paths, *overrides, "eval.progress=false"]))
    assert re.fullmatch(r"python -m alignexp\.report outputs/baselines", commands[3])

    zero, two = (json.loads((root / name / "eval.json").read_text()) for name in ("zero_shot", "two_shot"))
    for record, shots in ((zero, 0), (two, 2)):
        assert record["method"] == f"{shots}-shot prompting" and record["init_from"] == sft
        assert record["prompting"]["shots"] == shots and record["prompting"]["mean_shots"] == shots
        assert "kl" not in record["policy"] and record["n_prompts"] == 16
        for key in ("gold_reward", "response_tokens"):
            assert key in record["policy"] and key in record["reference"]
        comparisons = record["comparisons"]
        assert comparisons["judge"] == "gold" and comparisons["baseline"] == "reference_samples"
        assert 0 <= comparisons["win_rate_vs_reference"] <= 1 and "win_rate_vs_reference_lc" in comparisons
        assert (root / record["per_prompt_file"].join(["", ""])).name == "eval_prompts.jsonl"
    # 2-shot: each held-out prompt follows two demonstrations of the task's format ("<prompt>:<response>").
    assert re.fullmatch(r"[a-p]{8}:[a-p]+\n\n[a-p]{8}:[a-p]+\n\n[a-p]{8}:", two["prompting"]["example_prompt"])
    # The reference's samples are the same whichever baseline is measured (same prompts, same streams).
    assert zero["reference"]["gold_reward"] == two["reference"]["gold_reward"]

    written = write_report(root)
    methods = {p.method for p in written["points"]}
    assert methods == {"ranked_dpo", "0-shot prompting", "2-shot prompting"}  # the default loss
    rows = {r["method"]: r for r in csv.DictReader((root / "report" / "results.csv").open())}
    for method in methods:
        assert rows[method]["gold_reward"] and rows[method]["win_rate"] and rows[method]["lc_win_rate"]
    assert not rows["2-shot prompting"]["kl"] and rows["ranked_dpo"]["kl"]
    assert float(rows["2-shot prompting"]["gold_reward"]) == two["policy"]["gold_reward"]
    markdown = written["markdown"]
    assert "| 2-shot prompting |" in markdown and "| 0-shot prompting |" in markdown and "| ranked_dpo |" in markdown
    assert written["parameters"] == []  # the baselines' evaluation config is no swept parameter
    assert (root / "report" / "frontier.png").exists() and (root / "report" / "win_rate_vs_temperature.png").exists()


def test_a_baseline_without_a_reference_is_judged_against_the_dataset():
    """TL;DR from local fixtures, 1-shot, no reference model: the win rate is against the human summaries
    (the dataset baseline), the reference section is empty; on the synthetic task, whose baseline is the
    reference's samples, a missing reference is a ConfigError naming the key."""

    tokenizer = build_tokenizer(ModelArgs(arch=ARCH))
    model = build_model(ModelArgs(arch=ARCH, init_seed=1), tokenizer).eval()
    result = evaluate_prompting(model, None, tokenizer, tldr_task(), args(temperatures=[1.0], max_prompt_len=2048),
                                PromptingArgs(shots=1), judge=LengthJudge())
    assert result["reference"] == {} and result["prompting"]["mean_shots"] == 1
    assert result["comparisons"]["baseline"] == "dataset"
    assert result["comparisons"]["win_rate_vs_reference"] == result["policy"]["win_rate_vs_dataset"]
    assert result["comparisons"]["win_rate_vs_reference_lc"] == result["policy"]["win_rate_vs_dataset_lc"]
    assert "bleu" in result["policy"] and "kl" not in result["policy"]
    rows = result["per_prompt"]
    assert len(rows) == 4 and all(r["dataset_chars"] > 0 and "policy_win_rate_vs_dataset" in r for r in rows)
    with pytest.raises(ConfigError, match="reference: the win rate on task synthetic is against the reference"):
        evaluate_prompting(model, None, tokenizer, small_task(), args(), PromptingArgs(shots=0))
