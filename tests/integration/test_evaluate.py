"""Evaluation end to end on 2-layer models (alignexp/evaluation/, the CLI alignexp/evaluate.py): eval.json,
agreement, exports, and the judge group's spelling on the command line."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from alignexp.args import EvalArgs, from_mapping
from alignexp.errors import ConfigError
from alignexp.evaluate import run
from alignexp.evaluation.agreement import agreement_report, agreement_scorers
from alignexp.evaluation.policy import evaluate_policy
from alignexp.evaluation.results import format_table, write_eval_json
from alignexp.judges import build_judge
from alignexp.metrics.length_control import length_controlled_win_rate
from alignexp.metrics.preference import LabelledPair
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.tasks.synthetic import SyntheticTask
from alignexp.tasks.tldr import TldrTask

REPO = Path(__file__).resolve().parent.parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "eval"
ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def models():
    """A policy and a reference: the same 2-layer architecture with different seeded weights."""
    tokenizer = build_tokenizer(ModelArgs(arch=ARCH))
    policy = build_model(ModelArgs(arch=ARCH, init_seed=1), tokenizer).eval()
    reference = build_model(ModelArgs(arch=ARCH, init_seed=0), tokenizer).eval()
    return policy, reference, tokenizer


def small_task() -> SyntheticTask:
    return SyntheticTask(n_eval_prompts=6, n_responses=3, min_len=2, max_len=4, prompt_len=4)


def args(**overrides) -> EvalArgs:
    values = {"temperatures": [0.0, 1.0], "max_new_tokens": 6, "batch_size": 8, "progress": False}
    return EvalArgs(**{**values, **overrides})


def gold(task):
    """The run's judge as ``judge=auto`` builds it: the gold reward on the synthetic task."""
    return build_judge({"name": "auto"}, task)


def test_eval_json_on_the_synthetic_task(models, tmp_path):
    policy, reference, tokenizer = models
    task = small_task()
    result = evaluate_policy(policy, reference, tokenizer, task, args(best_of_n=[1, 2]), judge=gold(task))
    record = write_eval_json(tmp_path / "eval.json", task="synthetic", loss="dpo", model="tiny", result=result)
    loaded = json.loads((tmp_path / "eval.json").read_text())
    assert loaded == json.loads(json.dumps(record))
    for key in ("task", "loss", "model", "n_prompts", "policy", "reference", "comparisons"):  # the contract
        assert key in loaded
    assert loaded["n_prompts"] == 6 and loaded["temperature"] == 1.0
    assert set(loaded["by_temperature"]) == {"0", "1"}
    # policy and reference hold the same metric names
    assert set(loaded["policy"]) == set(loaded["reference"])
    for key in ("gold_reward", "gold_reward_stderr", "kl", "kl_stderr", "preference_accuracy",
                "response_tokens", "response_words", "truncated_fraction"):
        assert key in loaded["policy"], key
    assert "bleu" not in loaded["policy"]  # reference_metrics=auto: off on a task with a gold reward
    assert loaded["reference"]["kl"] == 0.0 and loaded["reference"]["preference_accuracy"] == 0.5
    comparisons = loaded["comparisons"]
    assert 0.0 <= comparisons["win_rate_vs_reference"] <= 1.0
    assert comparisons["judge"] == "gold" and comparisons["baseline"] == "reference_samples"
    assert comparisons["win_rate_vs_reference_first_position_rate"] == 0.5  # the gold judge has no bias
    assert comparisons["preference_examples"] == 6
    assert 0.0 <= comparisons["judge_preference_accuracy"] <= 1.0
    assert [e["n"] for e in loaded["best_of_n"]] == [1, 2] and loaded["best_of_n"][0]["kl"] == 0.0
    assert loaded["best_of_n"][1]["gold_reward"] >= loaded["best_of_n"][0]["gold_reward"]  # best of 2 >= 1
    assert len(loaded["by_temperature"]["1"]["examples"]) == 5
    assert "win rate vs reference" in format_table(result) and "T=0" in format_table(result)
    assert "length-controlled win rate" in format_table(result)
    # The per-prompt file beside eval.json: one row per (temperature, prompt) with lengths and verdicts,
    # from which the length-controlled win rate of eval.json is recomputed exactly.
    assert loaded["per_prompt_file"] == "eval_prompts.jsonl" and "per_prompt" not in loaded
    rows = [json.loads(line) for line in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 6 and {r["temperature"] for r in rows} == {0.0, 1.0}
    at_1 = [r for r in rows if r["temperature"] == 1.0]
    assert [r["index"] for r in at_1] == list(range(6))
    assert [r["policy_chars"] for r in at_1] == [len(r["policy_text"]) for r in at_1]
    wins = [r["win_rate_vs_reference"] for r in at_1]
    assert comparisons["win_rate_vs_reference"] == pytest.approx(sum(wins) / 6)
    recomputed = length_controlled_win_rate(wins, [r["policy_chars"] for r in at_1],
                                            [r["reference_chars"] for r in at_1], "win_rate_vs_reference")
    for key, value in recomputed.items():
        assert comparisons[key] == pytest.approx(value), key
    assert comparisons["win_rate_vs_reference_lc_ci_low"] <= comparisons["win_rate_vs_reference_lc"] \
        <= comparisons["win_rate_vs_reference_lc_ci_high"]
    assert [r["policy_gold_reward"] for r in at_1] == [task.gold_reward(None, r["policy_text"]) for r in at_1]
    # each row names its prompt and the task's reference text, so the file reads without the task
    examples = task.eval_examples()
    assert [r["prompt"] for r in at_1] == [ex.prompt for ex in examples]
    assert [r["target"] for r in at_1] == [ex.target if ex.target is not None else ex.responses[0] for ex in examples]
    table = format_table(result)
    t0 = next(line for line in table.splitlines() if line.strip().startswith("T=0"))
    by_t0 = loaded["by_temperature"]["0"]
    assert f"gold {by_t0['reference']['gold_reward']:.3f} ± {by_t0['reference']['gold_reward_stderr']:.3f} -> " \
           f"{by_t0['policy']['gold_reward']:.3f}" in t0  # the reference beside the policy at each temperature
    assert sum(r["policy_log_ratio"] for r in at_1) / 6 == pytest.approx(loaded["policy"]["kl"])


def test_policy_against_itself(models):
    """The policy evaluated against itself: identical samples (the same random streams), so every pair
    ties (win rate exactly 0.5), the log-ratio is 0 (KL 0) and the implicit reward orders nothing (0.5)."""
    _, reference, tokenizer = models
    task = small_task()
    result = evaluate_policy(reference, reference, tokenizer, task, args(temperatures=[1.0]), judge=gold(task))
    assert result["comparisons"]["win_rate_vs_reference"] == 0.5
    assert result["policy"]["kl"] == 0.0
    assert result["policy"]["preference_accuracy"] == 0.5
    assert result["policy"]["gold_reward"] == result["reference"]["gold_reward"]


def test_greedy_is_deterministic_and_temperatures_are_validated(models):
    policy, reference, tokenizer = models
    a = evaluate_policy(policy, reference, tokenizer, small_task(), args(temperatures=[0.0], preference_accuracy=False))
    b = evaluate_policy(policy, reference, tokenizer, small_task(), args(temperatures=[0.0], preference_accuracy=False))
    assert a["by_temperature"]["0"]["examples"] == b["by_temperature"]["0"]["examples"]
    assert "preference_accuracy" not in a["policy"]
    with pytest.raises(ValueError, match="eval.temperatures"):
        args(temperatures=[-1.0])
    with pytest.raises(ValueError, match="eval.baseline"):
        args(baseline="humans")
    with pytest.raises(ValueError, match="eval.best_of_n"):
        args(best_of_n=[0])
    assert from_mapping(EvalArgs, {"enabled": True, "temperatures": [0.5], "best_of_n": None},
                        "eval").temperatures == [0.5]


class LengthJudge:
    """Prefers the longer response (a stand-in for a reward model on a task without a gold reward)."""

    name = "length"

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]

    def compare(self, prompts, first, second):
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]


def tldr_task() -> TldrTask:
    return TldrTask(path=str(FIXTURES / "tldr_comparisons.jsonl"), sft_path=str(FIXTURES / "tldr_posts.jsonl"),
                    hub_id=None, sft_hub_id=None)


def test_task_with_references_and_human_comparisons(models):
    """TL;DR from local fixtures: BLEU/chrF/TER/ROUGE against the human summaries, win rate against
    them (the dataset baseline), and preference accuracy on the human comparisons."""
    policy, reference, tokenizer = models
    result = evaluate_policy(policy, reference, tokenizer, tldr_task(), args(temperatures=[1.0]), judge=LengthJudge())
    for who in ("policy", "reference"):
        metrics = result[who]
        for key in ("bleu", "chrf", "ter", "rouge_1", "rouge_2", "rouge_l", "rouge_l_stderr", "judge_score",
                    "win_rate_vs_dataset", "preference_accuracy"):
            assert key in metrics, (who, key)
        assert metrics["bleu_signature"].startswith("nrefs:1|")
    assert result["comparisons"]["baseline"] == "dataset" and result["comparisons"]["judge"] == "length"
    assert result["comparisons"]["win_rate_vs_reference"] == result["policy"]["win_rate_vs_dataset"]
    assert result["comparisons"]["win_rate_vs_reference_lc"] == result["policy"]["win_rate_vs_dataset_lc"]
    assert result["comparisons"]["preference_examples"] == 4
    # The length judge's accuracy on the fixture's 4 human comparisons: 3 of them prefer the longer summary.
    assert result["comparisons"]["judge_preference_accuracy"] == pytest.approx(0.75)
    assert "gold_reward" not in result["policy"]


@pytest.fixture(scope="module")
def saved_models(models, tmp_path_factory):
    """The two models saved as Hugging Face folders, as a training run leaves them."""
    policy, reference, tokenizer = models
    root = tmp_path_factory.mktemp("runs")
    for name, model in (("run/policy", policy), ("sft", reference)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "run" / "eval.json").write_text(json.dumps({"loss": "dpo", "init_from": str(root / "sft")}))
    return root


def compose_evaluate(tmp_path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from alignexp.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="evaluate", overrides=[
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "hardware.threads=1", "eval.progress=false", "eval.max_new_tokens=6",
            "eval.batch_size=8",
            f"model.arch.hidden_size={ARCH['hidden_size']}", f"model.arch.intermediate_size={ARCH['intermediate_size']}",
            f"model.arch.num_attention_heads={ARCH['num_attention_heads']}",
            f"model.arch.num_key_value_heads={ARCH['num_key_value_heads']}", *overrides])


def test_gold_judge_needs_a_gold_reward(saved_models, tmp_path):
    """judge=gold on a task without a gold reward fails when the judge is built, before any model loads."""
    cfg = compose_evaluate(tmp_path, f"policy={saved_models / 'run' / 'policy'}", "judge=gold", "task=tldr",
                           f"task.path={FIXTURES / 'tldr_comparisons.jsonl'}",
                           f"task.sft_path={FIXTURES / 'tldr_posts.jsonl'}")
    with pytest.raises(ConfigError, match="judge.name=gold: task 'tldr' has no gold reward"):
        run(cfg)
    assert not (tmp_path / "config.yaml").exists()  # nothing was written


def test_cli_mode_policy_finds_the_reference_of_a_training_run(saved_models, tmp_path, capsys):
    cfg = compose_evaluate(tmp_path, f"policy={saved_models / 'run' / 'policy'}", "eval.temperatures=[1.0]",
                           "task.n_eval_prompts=4", "task.n_responses=2", "task.prompt_len=4", "task.min_len=2",
                           "task.max_len=3")
    record = run(cfg)
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["loss"] == "dpo" and written["init_from"] == str(saved_models / "sft")
    assert written["n_prompts"] == 4 and record["policy"]["kl"] == written["policy"]["kl"]
    # it says which reference it used and where that came from, and records what produced the result
    source = f"init_from of {saved_models / 'run' / 'eval.json'}"
    assert f"reference: {saved_models / 'sft'} (from {source})" in capsys.readouterr().out
    assert written["reference_source"] == source
    assert set(written["provenance"]) == {"commit", "packages", "caches"} and "torch" in written["provenance"]["packages"]


def test_cli_mode_agreement_on_human_comparisons(tmp_path):
    """ROUGE-L against the human TL;DR prefers the human's choice on all 4 fixture comparisons; the
    longer summary is the human's choice on 3 of 4 (e3's preferred summary is the shorter one)."""
    cfg = compose_evaluate(tmp_path, "mode=agreement", "task=tldr",
                           f"task.path={FIXTURES / 'tldr_comparisons.jsonl'}",
                           f"task.sft_path={FIXTURES / 'tldr_posts.jsonl'}")
    record = run(cfg)
    report = json.loads((tmp_path / "agreement.json").read_text())["agreement"]
    assert record["n_pairs"] == 4 and record["n_pairs_with_reference"] == 4
    assert report["rouge_l"]["agreement"] == 1.0 and report["rouge_l"]["n"] == 4
    assert report["length"]["agreement"] == 0.75
    assert report["rouge_l"]["ci_low"] < 1.0 and report["bleu"]["n"] == 4
    assert "implicit_reward" not in report  # no policy given


def test_cli_mode_agreement_on_the_synthetic_task(saved_models, tmp_path):
    cfg = compose_evaluate(tmp_path, "mode=agreement", f"policy={saved_models / 'run' / 'policy'}",
                           f"reference={saved_models / 'sft'}", "judge=gold", "task.n_eval_prompts=4",
                           "task.n_responses=3", "task.prompt_len=4", "task.min_len=2", "task.max_len=3")
    report = run(cfg)["agreement"]
    assert set(report) == {"rouge_l", "rouge_1", "bleu", "length", "gold", "implicit_reward"}
    assert report["gold"]["n"] == report["implicit_reward"]["n"] > 0


def test_cli_mode_export(saved_models, tmp_path):
    cfg = compose_evaluate(tmp_path, "mode=export", f"policy={saved_models / 'run' / 'policy'}",
                           f"export.alpaca_eval={FIXTURES / 'alpaca_eval.json'}",
                           f"export.mt_bench={FIXTURES / 'mt_bench_question.jsonl'}", "export.max_new_tokens=4")
    record = run(cfg)
    assert record["model_id"] == "run"
    outputs = json.loads((tmp_path / "alpaca_eval" / "model_outputs.json").read_text())
    assert len(outputs) == 3 and all(o["generator"] == "run" for o in outputs)
    answers = (tmp_path / "mt_bench" / "model_answer" / "run.jsonl").read_text().splitlines()
    assert len(answers) == 3 and all(len(json.loads(a)["choices"][0]["turns"]) == 2 for a in answers)


def test_cli_rejects_a_bad_setting_with_the_key_name(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "alignexp.evaluate", "eval.baseline=humans",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "eval.baseline must be one of auto, reference, dataset" in done.stderr


class FirstShownJudge:
    """An LLM-judge stand-in (name ``llm``: compared, never scored) that always prefers the first shown."""

    name = "llm"

    def compare(self, prompts, first, second):
        return [1.0] * len(prompts)


def test_agreement_scorers_leave_out_leaking_references_and_judge_both_orders():
    """Pair 0's reference is its better response (HH's eval "reference" is the chosen one): ROUGE would
    agree by construction, so that pair is left out of the reference metrics. The position-biased
    judge ties every pair once both orders are averaged: agreement 0.5."""
    pairs = [LabelledPair("p", "a b c", "x y", reference="a b c"),
             LabelledPair("q", "the cat sat", "dog", reference="the cat sat on"),
             LabelledPair("r", "short", "much longer", reference=None)]
    report = agreement_report(pairs, agreement_scorers([FirstShownJudge()]))
    assert report["rouge_l"]["n"] == 1 and report["rouge_l"]["agreement"] == 1.0
    assert report["length"]["n"] == 3 and report["length"]["agreement"] == pytest.approx(2 / 3)
    assert report["llm"] == {**report["llm"], "agreement": 0.5, "ties": 3, "n": 3}
    only_leaking = agreement_report(pairs[:1], agreement_scorers([]))
    assert only_leaking["bleu"]["n"] == 0 and "skipped" in only_leaking["bleu"]


SMALL_SYNTHETIC = ("task.n_eval_prompts=4", "task.n_responses=2", "task.prompt_len=4", "task.min_len=2",
                   "task.max_len=3", "eval.temperatures=[1.0]")


def test_cli_judge_reward_model_spelling(saved_models, tmp_path):
    """``judge=reward_model judge.path=<run>/reward_model`` composes and scores: the eval.json judge score
    is the mean of that reward model's scores of the policy's samples (recomputed here from the examples)."""
    from alignexp.judges.reward_model import RewardModelJudge, build_reward_model

    tokenizer = build_tokenizer(ModelArgs(arch=ARCH))
    folder = tmp_path / "rm_run" / "reward_model"
    build_reward_model(ModelArgs(arch=ARCH, init_seed=3), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = compose_evaluate(tmp_path / "out", f"policy={saved_models / 'run' / 'policy'}", "judge=reward_model",
                           f"judge.path={folder}", *SMALL_SYNTHETIC)
    assert cfg.judge.path == str(folder) and "judge" not in cfg.eval
    record = run(cfg)
    assert record["comparisons"]["judge"] == "reward_model"
    examples = record["by_temperature"]["1"]["examples"]
    assert len(examples) == record["n_prompts"] == 4
    scores = RewardModelJudge(folder).score([e["prompt"] for e in examples], [e["policy"] for e in examples])
    assert record["policy"]["judge_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    assert "gold_reward" in record["policy"]  # the task's gold reward is still measured beside the judge
    assert 0.0 <= record["comparisons"]["judge_preference_accuracy"] <= 1.0


def test_cli_judge_settings_that_cannot_work_fail_naming_the_key(saved_models, tmp_path):
    """Before any model loads: a reward model judge without its folder, or with a folder that is not there,
    and an llm judge without its model name."""
    policy = f"policy={saved_models / 'run' / 'policy'}"
    with pytest.raises(ConfigError, match="judge.path: the reward_model judge needs the folder"):
        run(compose_evaluate(tmp_path / "a", policy, "judge=reward_model"))
    with pytest.raises(ConfigError, match="judge.path=.*missing_run/reward_model: the reward model cannot be"):
        run(compose_evaluate(tmp_path / "b", policy, "judge=reward_model",
                             f"judge.path={tmp_path / 'missing_run' / 'reward_model'}"))
    with pytest.raises(ConfigError, match="judge.model: the llm judge needs the endpoint's model name"):
        run(compose_evaluate(tmp_path / "c", policy, "judge=llm", "judge.base_url=http://127.0.0.1:9/v1"))
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written


def test_cli_judge_llm_spelling(saved_models, tmp_path):
    """``judge=llm judge.base_url=... judge.model=...`` composes and judges through the endpoint (a local
    stand-in that prefers the longer text): the win rate is the length rule applied to the samples, and
    in mode=export the same judge grades the MT-Bench answers (each of its 6 grading requests is asked)."""
    from tests.fixtures.llm_server import LLMServer

    with LLMServer("good") as server:
        judge = ("judge=llm", f"judge.base_url={server.base_url}", "judge.model=test-model", "judge.max_workers=1")
        cfg = compose_evaluate(tmp_path / "policy", f"policy={saved_models / 'run' / 'policy'}", *judge,
                               *SMALL_SYNTHETIC)
        record = run(cfg)
        examples = record["by_temperature"]["1"]["examples"]
        wins = [1.0 if len(e["policy"]) > len(e["reference"]) else 0.5 if len(e["policy"]) == len(e["reference"])
                else 0.0 for e in examples]
        assert record["comparisons"]["judge"] == "llm"
        assert record["comparisons"]["win_rate_vs_reference"] == pytest.approx(sum(wins) / len(wins))
        assert server.requests and all(r["body"]["model"] == "test-model" for r in server.requests)
        asked = len(server.requests)

        cfg = compose_evaluate(tmp_path / "export", "mode=export", f"policy={saved_models / 'run' / 'policy'}",
                               f"export.mt_bench={FIXTURES / 'mt_bench_question.jsonl'}", "export.max_new_tokens=4",
                               *judge)
        scores = run(cfg)["mt_bench_scores"]
    # The stand-in answers FastChat's grading prompts without a [[rating]]: every rating is unparsed.
    assert scores["turn_1_unparsed"] == 3 and scores["turn_2_unparsed"] == 3
    assert len(server.requests) - asked == 6
    judgments = (tmp_path / "export" / "mt_bench" / "model_judgment" / "single.jsonl").read_text().splitlines()
    assert len(judgments) == 6 and json.loads(judgments[0])["judge"][0] == "test-model"


def test_cli_export_with_the_default_judge_grades_nothing(saved_models, tmp_path):
    cfg = compose_evaluate(tmp_path, "mode=export", f"policy={saved_models / 'run' / 'policy'}",
                           f"export.mt_bench={FIXTURES / 'mt_bench_question.jsonl'}", "export.max_new_tokens=2")
    record = run(cfg)
    assert "mt_bench_scores" not in record and "judge=llm" in record["mt_bench_grading"]
    with pytest.raises(ConfigError, match="judge=gold: this judge cannot answer free-form prompts"):
        run(compose_evaluate(tmp_path / "gold", "mode=export", f"policy={saved_models / 'run' / 'policy'}",
                             f"export.mt_bench={FIXTURES / 'mt_bench_question.jsonl'}", "judge=gold"))
    assert not (tmp_path / "gold").exists()  # refused before any answer was generated


DOC_COMMANDS = sorted({m.group(1).strip() for doc in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
                       for m in re.finditer(r"(?:^|\$ |`)(python -m alignexp\.evaluate[^`#\n\\]*)",
                                            doc.read_text(), re.M)})


def test_the_evaluation_docs_show_commands():
    assert any("judge=reward_model judge.path=" in c for c in DOC_COMMANDS)
    assert any("judge=llm judge.base_url=" in c for c in DOC_COMMANDS)


@pytest.mark.parametrize("command", DOC_COMMANDS)
def test_evaluate_commands_in_the_docs_compose(command, tmp_path):
    """Every ``python -m alignexp.evaluate`` command of the README and docs composes into typed arguments
    (a placeholder such as ``<run>`` stands for a path)."""
    from alignexp.evaluate import parse

    runnable = re.sub(r"<[^<>\s]+>", "placeholder", command)
    assert "<" not in runnable, "a placeholder with a space cannot be run as written"
    overrides = [a for a in shlex.split(runnable)[3:] if a != "-m" and not a.startswith("hydra")]
    args = parse(compose_evaluate(tmp_path, *[re.sub(r"=([^,{]+),.*$", r"=\1", a) for a in overrides]))
    assert args.mode in ("policy", "prompting", "benchmarks", "agreement", "export") and args.judge["name"]
