"""Bad inputs fail in the first seconds, before any model is built, with a message naming the key and the fix.

Each row of the table is an override a user could type and what the command must answer. Every row
runs through its CLI (``python -m alignexp.<command>``: Hydra, the error mapping, the exit status), one
after another in one subprocess (tests/fixtures/cli_rows.py), so the imports are paid once; the first
row's time counts them. That process records every ``torch.nn.Module`` constructed while a row runs: a
row passes only if none was (a last, valid row that does build a model shows that the record works).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR
from alignexp.inputs import check_writable, looks_local
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"
SECONDS = 20  # each row, on 2 busy cores; the first row includes the imports


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A policy folder as a training run writes it: the tiny model (seeded, untrained) and its tokenizer."""
    from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer

    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml")))
    tokenizer = build_tokenizer(args)
    folder = tmp_path_factory.mktemp("run") / "policy"
    build_model(args, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def closed_port() -> int:
    """A local port nothing listens on (bound, then released): a connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def folders(policy, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("table")
    (root / "a-file").write_text("not a folder")
    locked = root / "locked"
    locked.mkdir(mode=0o555)
    return {"root": root, "policy": policy, "file": root / "a-file", "locked": locked,
            "endpoint": f"http://127.0.0.1:{closed_port()}/v1", "tied": tied_embeddings_model(root / "gpt2")}


def tied_embeddings_model(folder: Path) -> Path:
    """A tiny GPT-2 (its output head tied to its input embeddings) saved with the byte tokenizer."""
    from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer

    tokenizer = build_tokenizer(ModelArgs())
    arch = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}
    build_model(ModelArgs(arch=arch, parity_probe=False), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


Row = tuple[str, list[str], int, list[str], list[str]]


def table(folders: dict) -> dict[str, Row]:
    """name -> (command, overrides, exit status, texts the message holds, texts it must not hold)."""
    policy, file_in_the_way, locked, endpoint = (folders[k] for k in ("policy", "file", "locked", "endpoint"))
    no_model = FIXTURES / "mt"  # a folder of data files, no config.json
    train, de_en = "alignexp.train", f"{FIXTURES}/mt/alma_de_en.jsonl"
    rows = {
        # the cases
        "mt_language_pairs": (train, ["task=mt", f"task.path={de_en}", f"task.eval_path={FIXTURES}/mt/wmt22.jsonl"], 1,
                              [f"task.path={de_en}", "2 records read; 2 left out: language_pair de-en not in "
                               "task.language_pairs=[cs-en] (2)"], []),
        "tldr_eval_data": (train, ["task=tldr", f"task.path={FIXTURES}/tldr/comparisons.jsonl"], 1,
                           ["evaluation data (eval.enabled=false skips evaluation)",
                            "hub dataset trl-lib/tldr, split 'test'", "Point task.sft_path at a local copy"], []),
        "gpu_without_cuda": (train, ["hardware=deepspeed_zero3"], 2,
                             ["hardware.accelerator=gpu (hardware=deepspeed_zero3): no CUDA device is visible",
                              "hardware=cpu", "hardware.accelerator=cpu"], []),
        "init_from_missing": (train, ["init_from=/nonexistent/policy"], 1,
                              ["init_from=/nonexistent/policy: no such folder", "nothing is downloaded"],
                              ["model.path", "huggingface-cli", "download /nonexistent"]),
        "folder_without_model": (train, [f"model.path={no_model}"], 1,
                                 [f"model.path={no_model}: this folder holds no model (no config.json)"],
                                 ["sentencepiece", "tiktoken"]),
        # more bad inputs
        "empty_data_file": (train, ["task=hh", f"task.path={FIXTURES}/empty/empty.jsonl"], 1,
                            ["hh preferences (task.path=", "no records in", "empty.jsonl"], []),
        "another_tasks_schema": (train, ["task=hh", f"task.path={FIXTURES}/tldr/comparisons.jsonl"], 1,
                                 ["comparisons.jsonl, record 0 (numbered from 0), field 'chosen': missing field",
                                  "'info', 'split', 'summaries'", "data of another task's schema? (task=hh reads it)"],
                                 []),
        "reward_judge_on_a_policy": (train, ["judge=reward_model", f"judge.path={policy}"], 2,
                                     [f"judge.path={policy}: this folder holds a LlamaForCausalLM (a policy), "
                                      "not a reward model"], []),
        "llm_endpoint_refused": (train, ["judge=llm", f"judge.base_url={endpoint}", "judge.model=gpt-4"], 2,
                                 [f"judge.base_url={endpoint}: the endpoint does not answer GET {endpoint}/models",
                                  "refused", "judge.check_endpoint=false"], []),
        "output_under_a_file": (train, [f"paths.output_dir={file_in_the_way}/run"], 2,
                                [f"paths.output_dir={file_in_the_way}/run: {file_in_the_way} is a file"], []),
        # a stage's own check (the ppo stage's), before the SFT policy is trained
        "ppo_rollout_batch": (train, ["loss=ppo", "task.n_train_prompts=4", "ppo.rollout_batch_size=8",
                                      "ppo.n_minibatches=2"], 2,
                              ["ppo.rollout_batch_size=8 is more than the task's 4 training prompts"], []),
        # an architecture the hardware cannot train, refused before sampling and the reference precompute
        "fsdp_tied_embeddings": (train, [f"model.path={folders['tied']}", "hardware=fsdp", "hardware.accelerator=cpu",
                                         "hardware.devices=2"], 2,
                                 ["hardware=fsdp: model.path: gpt2 (GPT2LMHeadModel) ties its output head to its "
                                  "input embeddings", "use hardware=deepspeed_zero3"], []),
        # several problems: each named, in one message
        "two_problems": (train, ["init_from=/nonexistent/policy", "judge=llm", f"judge.base_url={endpoint}",
                                 "judge.model=gpt-4"], 1,
                         ["train: 2 problems, found before any model was built",
                          "1. init_from=/nonexistent/policy: no such folder",
                          f"2. judge.base_url={endpoint}: the endpoint does not answer"], []),
        # the other commands
        "sample_policy_missing": ("alignexp.sample", ["policy=/nonexistent/policy", f"output={folders['root']}/s.jsonl"],
                                  1, ["policy=/nonexistent/policy: no such folder"], ["huggingface-cli"]),
        "evaluate_folder_without_model": ("alignexp.evaluate", [f"policy={no_model}", f"reference={policy}"], 1,
                                          [f"policy={no_model}: this folder holds no model (no config.json)"], []),
        "data_nothing_left": ("alignexp.data", ["task=mt", f"task.path={de_en}"], 1,
                              ["2 records read; 2 left out: language_pair de-en not in task.language_pairs=[cs-en]"],
                              []),
    }
    if not AS_ROOT:  # root writes through permissions: the run would go on (output_under_a_file covers root)
        rows["output_in_a_locked_folder"] = (train, [f"paths.output_dir={locked}/run"], 2,
                                             [f"paths.output_dir={locked}/run: cannot create {locked}/run "
                                              f"(no write permission in {locked})"], [])
    return rows


AS_ROOT = os.geteuid() == 0
NAMES = ["mt_language_pairs", "tldr_eval_data", "gpu_without_cuda", "init_from_missing", "folder_without_model",
         "empty_data_file", "another_tasks_schema", "reward_judge_on_a_policy", "llm_endpoint_refused",
         "output_under_a_file", "ppo_rollout_batch", "fsdp_tied_embeddings", "two_problems", "sample_policy_missing",
         "evaluate_folder_without_model", "data_nothing_left", *(["output_in_a_locked_folder"] * (not AS_ROOT))]
CONTROL = ["alignexp.sample", ["n=1", "max_prompts=1", "sampling.max_new_tokens=2", "hardware.threads=1"]]
"""The last row: sampling from a real policy builds a model, and the record shows it."""


@pytest.fixture(scope="module")
def results(folders) -> dict[str, dict]:
    """Every row of the table, and the control row, through the CLIs in one subprocess (module docstring)."""
    rows = table(folders)
    assert sorted(rows) == sorted(NAMES)
    root = folders["root"]
    control = [CONTROL[0], [f"policy={folders['policy']}", f"output={root}/control.jsonl", *CONTROL[1]]]
    spec = [[module, [*args, f"hydra.run.dir={root / 'runs' / name}"]]
            for name, (module, args, *_) in [*rows.items(), ("control", control)]]
    (root / "rows.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "ALIGNEXP_CACHE_DIR": str(root / "cache")}
    done = subprocess.run([sys.executable, str(FIXTURES / "cli_rows.py"), str(root / "rows.json")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(spec), done.stdout[-3000:]
    return dict(zip([*rows, "control"], lines))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_fails_fast_naming_the_key(name, folders, results):
    module, args, status, expected, absent = table(folders)[name]
    result, where = results[name], f"python -m {module} {' '.join(args)}"
    message = result["stderr"]
    assert result["status"] == status, f"{where}:\n{message[-2000:]}"
    for text in expected:
        assert text in message, f"{where}: {text!r} not in:\n{message}"
    for text in absent:
        assert text not in message, f"{where}: {text!r} in:\n{message}"
    assert "Traceback" not in message, where
    assert result["models_built"] == [], f"{where}: models were built: {result['models_built'][:5]}"
    assert result["seconds"] < SECONDS, f"{where}: {result['seconds']:.1f}s"
    if module == "alignexp.data":
        assert result["stdout"] == ""  # no summary for no data


def test_the_record_sees_a_model_built(folders, results):
    """The control row samples one prompt from a real policy: it passes the preflight, builds the model, and
    the record lists it (so an empty record above means no model was built)."""
    control = results["control"]
    assert control["status"] == 0, control["stderr"][-2000:]
    assert any("LlamaForCausalLM" in name for name in control["models_built"])
    assert len((folders["root"] / "control.jsonl").read_text().splitlines()) == 1


def test_what_looks_like_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for local in ("/abs/policy", "./policy", "../policy", "~/policy", "outputs/policy", "a/b/c", "outputs"):
        assert looks_local(local), local
    for hub in ("gpt2", "meta-llama/Llama-2-7b-hf", "org/model"):
        assert not looks_local(hub), hub


def test_writable_folders(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "deeper", "paths.output_dir")  # can be created
    check_writable(tmp_path, "paths.output_dir")
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"paths.cache_dir=.*/file/x: .*/file is a file"):
        check_writable(tmp_path / "file" / "x", "paths.cache_dir")
    # what a user without write permission meets (the tests may run as root, who writes anyway)
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"paths.output_dir=.*/new: cannot create .*/new \(no write permission in "):
        check_writable(tmp_path / "new", "paths.output_dir")

    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", refused)
    with pytest.raises(ValueError, match=r"paths.output_dir=.*: cannot write in .* \(Permission denied\); choose"):
        check_writable(tmp_path, "paths.output_dir")


def test_endpoint_check_against_a_local_server():
    """GET <base_url>/models: a server that lists models passes; a key it rejects, a URL without /v1 and a
    closed port are each named; check_endpoint=false skips the request."""
    from alignexp.inputs import check_judge
    from alignexp.tasks.synthetic import SyntheticTask
    from tests.fixtures.llm_server import LLMServer

    task = SyntheticTask()
    judge = {"_target_": "alignexp.judges.llm.LLMJudge", "name": "llm", "model": "test-model"}
    with LLMServer("good") as server:
        check_judge({**judge, "base_url": server.base_url}, task)
        with pytest.raises(ValueError, match=r"judge.base_url=.*: GET .*/models has no /models there \(HTTP 404\): "
                                             r"is the /v1 missing"):
            check_judge({**judge, "base_url": server.base_url.removesuffix("/v1")}, task)
        server.mode = "401"
        with pytest.raises(ValueError, match=r"rejects the API key \(HTTP 401; the key is read from \$KEY\)"):
            check_judge({**judge, "base_url": server.base_url, "api_key_env": "KEY"}, task)
        assert server.requests == []  # nothing was asked of the chat endpoint
    closed = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(ValueError, match=r"sampler.judge.base_url=.*does not answer .*sampler.judge.check_endpoint=false"):
        check_judge({**judge, "base_url": closed}, task, "sampler.judge")
    check_judge({**judge, "base_url": closed, "check_endpoint": False}, task)


def test_model_folders_are_checked_without_loading(policy, tmp_path):
    from alignexp.inputs import ModelUnavailable, check_model_source, check_reward_model

    check_model_source(str(policy), "init_from")
    with pytest.raises(ModelUnavailable, match=r"init_from=.*/run0: this folder holds no model \(no config.json\) "
                                               r"\(but .*/run0/policy holds one\)"):
        check_model_source(str(policy.parent), "init_from")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((policy / "config.json").read_text())
    with pytest.raises(ModelUnavailable, match=r"policy=.*/bare: config.json but no weights"):
        check_model_source(str(bare), "policy")
    with pytest.raises(ModelUnavailable, match=r"model.path=.*config.json: a file, not a folder"):
        check_model_source(str(policy / "config.json"), "model.path")
    with pytest.raises(ModelUnavailable, match=r"model.path=not-a-cached/model: not in the local Hugging Face cache, "
                                               r"and the hub cannot be reached from here \(offline mode\)"):
        check_model_source("not-a-cached/model", "model.path")  # the tests run offline (conftest)
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (classifier / name).write_text("")
    (classifier / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"], '
                                            '"id2label": {"0": "bad", "1": "good"}}')
    with pytest.raises(ModelUnavailable, match=r"judge.path=.*classifier: a classifier with 2 outputs; a reward "
                                               r"model has one"):
        check_reward_model(str(classifier), "judge")


def test_the_accelerator_not_the_strategy_needs_cuda(monkeypatch):
    import torch

    from alignexp.args import HardwareArgs
    from alignexp.inputs import check_accelerator

    zero3 = dict(name="deepspeed_zero3", strategy="deepspeed", zero_stage=3, devices="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"hardware.accelerator=gpu \(hardware=deepspeed_zero3\): no CUDA device"):
        check_accelerator(HardwareArgs(accelerator="gpu", **zero3))
    check_accelerator(HardwareArgs(accelerator="cpu", **zero3))  # DeepSpeed on CPU processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_accelerator(HardwareArgs(name="ddp", accelerator="gpu", devices=2, strategy="ddp"))
    with pytest.raises(ValueError, match=r"hardware.devices=8 \(hardware=ddp\): 2 CUDA devices visible"):
        check_accelerator(HardwareArgs(name="ddp", accelerator="gpu", devices=8, strategy="ddp"))
    with pytest.raises(ValueError, match=r"hardware.devices=\[0, 3\]"):
        check_accelerator(HardwareArgs(name="gpu", accelerator="gpu", devices=[0, 3]))
