"""``python -m alignexp.sample``: killed midway (SIGKILL) and restarted, it writes the same file as an
uninterrupted run; torn lines and partial chunks are redone; other settings on the same file are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR
from alignexp.sample import SampleError, check_meta, resume_point

REPO = Path(__file__).resolve().parents[2]
PROMPTS, CHUNK = 30, 3


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """The tiny model with its seeded initial weights, saved as an HF folder (no training needed)."""
    from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer

    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml")))
    tokenizer = build_tokenizer(args)
    folder = tmp_path_factory.mktemp("policy")
    build_model(args, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command(policy: Path, output: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "alignexp.sample", f"policy={policy}", f"output={output}",
            f"max_prompts={PROMPTS}", "n=2", f"chunk_size={CHUNK}", "sampling.max_new_tokens=24", "seed=3",
            "judge=gold", "hardware.threads=1", f"hydra.run.dir={run_dir}", f"paths.cache_dir={run_dir}/cache",
            *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_killed_and_restarted_equals_uninterrupted(policy, tmp_path):
    """Three subprocesses (an uninterrupted run, a run SIGKILLed after two chunks, its restart): about 30 s
    on a quiet 2-core machine, mostly interpreter start-up; marked slow."""
    whole = tmp_path / "whole.jsonl"
    done = subprocess.run(command(policy, whole, tmp_path / "r1"), cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines(whole) == PROMPTS

    resumed = tmp_path / "resumed.jsonl"
    process = subprocess.Popen(command(policy, resumed, tmp_path / "r2"), cwd=REPO, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while lines(resumed) < 2 * CHUNK and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    written = lines(resumed)
    assert 2 * CHUNK <= written < PROMPTS, f"the kill did not land midway ({written} of {PROMPTS} lines)"

    again = subprocess.run(command(policy, resumed, tmp_path / "r3"), cwd=REPO, env=environment(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert resumed.read_bytes() == whole.read_bytes()
    record = json.loads(whole.read_text().splitlines()[5])
    assert record["index"] == 5 and len(record["responses"]) == 2 == len(record["logps"]) == len(record["scores"])
    assert record["judge"] == "gold" and all(lp < 0 for lp in record["logps"])


def test_interrupted_in_process_and_resumed_equals_uninterrupted(policy, tmp_path):
    """The same property in-process and fast: the judge raises KeyboardInterrupt on the third chunk."""
    from alignexp.judges import GoldJudge
    from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
    from alignexp.sample import SampleArgs, sample_to_jsonl
    from alignexp.tasks.synthetic import SyntheticTask

    task = SyntheticTask(n_train_prompts=12)
    tokenizer = build_tokenizer(ModelArgs(path=str(policy)))
    model = build_model(ModelArgs(path=str(policy)), tokenizer)
    prompts = task.prompts("train")
    args = SampleArgs(n=2, chunk_size=3, seed=3, max_new_tokens=12)

    class Interrupting(GoldJudge):
        calls = 0

        def score(self, prompts, responses):
            Interrupting.calls += 1
            if Interrupting.calls == 3:
                raise KeyboardInterrupt
            return super().score(prompts, responses)

    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert sample_to_jsonl(model, tokenizer, prompts, whole, args, judge=GoldJudge(task),
                           progress=False) == 12
    with pytest.raises(KeyboardInterrupt):
        sample_to_jsonl(model, tokenizer, prompts, resumed, args, judge=Interrupting(task), progress=False)
    assert lines(resumed) == 6
    assert sample_to_jsonl(model, tokenizer, prompts, resumed, args, judge=GoldJudge(task),
                           progress=False) == 6
    assert resumed.read_bytes() == whole.read_bytes()
    assert sample_to_jsonl(model, tokenizer, prompts, resumed, args, judge=GoldJudge(task),
                           progress=False) == 0  # nothing left to do
    with pytest.raises(SampleError, match="n differ"):
        sample_to_jsonl(model, tokenizer, prompts, resumed, SampleArgs(n=3, chunk_size=3, seed=3), progress=False)


def test_resume_point_drops_torn_lines_and_partial_chunks(tmp_path):
    path = tmp_path / "samples.jsonl"
    good = [json.dumps({"index": i}) + "\n" for i in range(7)]
    path.write_text("".join(good) + '{"index": 7, "resp')  # 7 full lines and a torn one
    assert resume_point(path, chunk_size=3, total=10) == 6  # chunks of 3: the 7th line's chunk is redone
    assert path.read_text() == "".join(good[:6])
    assert resume_point(path, chunk_size=3, total=6) == 6  # complete
    path.write_text("".join(good[:2]) + json.dumps({"index": 5}) + "\n")
    with pytest.raises(SampleError, match="line 3: prompt index 5, expected 2"):
        resume_point(path, chunk_size=1, total=10)
    assert resume_point(tmp_path / "missing.jsonl", chunk_size=3, total=10) == 0


def test_other_settings_on_the_same_file_are_refused(tmp_path):
    path = tmp_path / "samples.jsonl"
    check_meta(path, {"n": 2, "seed": 0})
    check_meta(path, {"n": 2, "seed": 0})
    with pytest.raises(SampleError, match="seed differ"):
        check_meta(path, {"n": 2, "seed": 1})
