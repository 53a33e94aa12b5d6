"""Checks of single inputs, without building anything: model folders and hub ids, reward-model folders,
judges and their endpoints, the accelerator, writable folders. Each raises an
:class:`~alignexp.errors.AlignexpError` whose message names the setting, the file and the fix.

:mod:`alignexp.preflight` runs them before a run builds a model, and the pipeline's stages declare
theirs with them (``register_stage(..., check=...)``). This module imports neither transformers nor
the pipeline, so a failing check answers in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignexp.errors import AlignexpError, ConfigError
from alignexp.tasks.loading import DataUnavailable, NoExamples

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
REWARD_MODEL_TARGET = "alignexp.judges.reward_model.RewardModelJudge"
LLM_TARGET = "alignexp.judges.llm.LLMJudge"


class ModelUnavailable(AlignexpError, RuntimeError):
    """A model or tokenizer cannot be loaded: no such folder, a folder without a model, a hub id that is
    neither cached nor reachable. The message names the setting that pointed at it."""


def looks_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a local folder rather than a hub id (``name`` or ``owner/name``): it is
    absolute, starts with ``./``, ``../`` or ``~``, exists, has more than one ``/``, or its parent exists."""
    text = str(path)
    if text.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(text) or text in (".", ".."):
        return True
    local = Path(text).expanduser()
    if local.exists() or text.count("/") > 1:
        return True
    return str(local.parent) not in ("", ".") and local.parent.is_dir()


def missing_model_message(path: str, key: str | None, what: str = "model", weights: bool = True) -> str | None:
    """Why the local folder ``path`` (set by ``key``) holds no loadable ``what``; None when it looks complete.
    ``weights=False``: only a tokenizer is read from it (config.json or a tokenizer file suffices)."""
    folder = Path(path).expanduser()
    where, setting = (f"{key}={path}", key) if key else (str(path), "the setting")
    if not folder.exists():
        parent = next((p for p in folder.parents if p.exists()), None)
        return (f"{where}: no such folder (a local path, so nothing is downloaded; the nearest existing folder "
                f"is {parent}). Point {setting} at a folder written by save_pretrained, e.g. a training run's "
                f"<run>/policy")
    if not folder.is_dir():
        return f"{where}: a file, not a folder; point {setting} at the folder that holds config.json"
    if not weights and any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    if not (folder / "config.json").is_file():
        inside = sorted(str(p.parent.relative_to(folder)) for p in folder.glob("*/config.json"))
        hint = f" (but {folder / inside[0]} holds one)" if inside else ""
        return f"{where}: this folder holds no {what} (no config.json){hint}"
    if weights and not any((folder / name).is_file() for name in WEIGHT_FILES) \
            and not any(folder.glob("*.safetensors")):
        return (f"{where}: config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); the {what} was not "
                f"saved completely")
    return None


def check_model_source(path: str, key: str, what: str = "model", tokenizer: bool = True) -> None:
    """A local folder that holds a model (and its tokenizer), or a hub id that is cached or on the hub."""
    if looks_local(path):
        problem = missing_model_message(path, key, what)
        if problem is None and tokenizer and not any((Path(path).expanduser() / f).is_file()
                                                     for f in TOKENIZER_FILES):
            problem = (f"{key}={path}: no tokenizer in this folder ({', '.join(TOKENIZER_FILES[:2])}); save "
                       f"the tokenizer with the model (tokenizer.save_pretrained)")
        if problem:
            raise ModelUnavailable(problem)
        return
    check_hub_model(path, key, what)


def check_hub_model(repo: str, key: str, what: str = "model") -> None:
    """A hub id: in the local Hugging Face cache, or (network allowing) on the hub; nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    from alignexp.hub import hub_reachable

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    download = (f"Download it where there is network (`huggingface-cli download {repo} --local-dir "
                f"/some/folder`) and set {key}=/some/folder")
    if not hub_reachable():
        raise ModelUnavailable(f"{key}={repo}: not in the local Hugging Face cache, and the hub cannot be "
                               f"reached from here (offline mode), so the {what} cannot be loaded. {download}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo, timeout=10)
    except GatedRepoError:
        raise ModelUnavailable(f"{key}={repo}: a gated model; accept its licence on the hub and log in "
                               f"(`huggingface-cli login`), or {download[0].lower()}{download[1:]}") from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"{key}={repo}: no such model on the hub (a typo? a private repository needs "
                               f"`huggingface-cli login`); a local folder is written ./{repo} or /path/to/it") \
            from None
    except Exception as error:  # noqa: BLE001 - the hub answered oddly: loading will tell; do not block the run
        log.warning("%s=%s: could not ask the hub whether it exists (%s)", key, repo, error)


def check_reward_model(path: str | None, key: str) -> None:
    """A reward model's folder: a sequence classifier with one output, not a policy (a causal LM)."""
    if not path:
        raise ConfigError(f"{key}.path: the reward_model judge needs the folder of a trained reward model "
                          f"(<run>/reward_model, written by `python -m alignexp.train experiment=reward_model`)")
    try:
        check_model_source(str(path), f"{key}.path", "reward model")
    except ModelUnavailable as error:
        reason = str(error).split(": ", 1)[1]
        raise ModelUnavailable(f"{key}.path={path}: the reward model cannot be loaded: {reason}") from None
    if not looks_local(path):
        return
    config = json.loads((Path(path).expanduser() / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        kind = f"a {', '.join(architectures)}" if architectures else "no architecture"
        causal = any(a.endswith("ForCausalLM") for a in architectures)
        raise ModelUnavailable(f"{key}.path={path}: this folder holds {kind}{' (a policy)' * causal}, not a "
                               f"reward model (a sequence classifier with one output, as <run>/reward_model of "
                               f"`python -m alignexp.train experiment=reward_model` is)")
    labels = len(config.get("id2label") or {"0": ""})
    if labels != 1:
        raise ModelUnavailable(f"{key}.path={path}: a classifier with {labels} outputs; a reward model has one")


def check_endpoint(base_url: str, key: str, api_key_env: str | None = None, model: str | None = None,
                   timeout_s: float = 10.0) -> None:
    """An OpenAI-compatible endpoint answers ``GET <base_url>/models`` (and, where it lists them, serves
    ``model``); ``{key}.check_endpoint=false`` skips this."""
    url = base_url.rstrip("/") + "/models"
    skip = f"(or set {key}.check_endpoint=false to skip this check)"
    headers = {}
    token = os.environ.get(api_key_env) if api_key_env else None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            body = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            why = f"rejects the API key (HTTP {error.code}; the key is read from ${api_key_env})"
        elif error.code == 404:
            why = "has no /models there (HTTP 404): is the /v1 missing from the URL?"
        else:
            why = f"answers HTTP {error.code}"
        raise ModelUnavailable(f"{key}.base_url={base_url}: GET {url} {why} {skip}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ModelUnavailable(f"{key}.base_url={base_url}: the endpoint does not answer GET {url} ({reason}); "
                               f"start the server or fix the URL {skip}") from None
    try:
        served = [m.get("id") for m in json.loads(body).get("data", [])]
    except (ValueError, AttributeError, TypeError):
        return
    if model and served and model not in served:
        log.warning("%s.model=%s: the endpoint lists %s, not this model", key, model, ", ".join(map(str, served)))


def check_judge(config: Mapping[str, Any], task: Any, key: str = "judge", *, required: bool = False) -> None:
    """What the judge option ``config`` will need (see :func:`alignexp.judges.build_judge`), without building
    it: a gold reward on the task, a reward model's folder, an LLM endpoint that answers. ``required``: the
    stage needs a judge, so ``none`` (or ``auto`` on a task without a gold reward) is an error. A problem is
    a :class:`ConfigError` (exit status 2), as :func:`~alignexp.judges.build_judge` raises it."""
    config = {k: v for k, v in dict(config).items() if v is not None}
    name, target = config.get("name", "auto"), config.get("_target_", "")
    choose = "judge=" if key == "judge" else f"judge@{key}="
    if name in ("none", "auto") and not (name == "auto" and task.has_gold_reward):
        if required:
            raise ConfigError(f"{key}: task '{task.name}' has no gold reward, and this stage needs a judge; choose "
                              f"one, e.g. {choose}reward_model {key}.path=<run>/reward_model")
        return
    if name == "gold" or (name == "auto" and task.has_gold_reward):
        if not task.has_gold_reward:
            raise ConfigError(f"{key}.name=gold: task '{task.name}' has no gold reward; use {choose}reward_model "
                              f"(with {key}.path) or {choose}llm")
    elif target == REWARD_MODEL_TARGET:
        try:
            check_reward_model(config.get("path"), key)
        except ModelUnavailable as error:
            raise ConfigError(str(error)) from None
    elif target == LLM_TARGET:
        if not config.get("base_url"):
            raise ConfigError(f"{key}.base_url: the llm judge needs an OpenAI-compatible endpoint, "
                              f"e.g. http://localhost:8000/v1")
        if not config.get("model"):
            raise ConfigError(f"{key}.model: the llm judge needs the endpoint's model name, e.g. gpt-4-0314")
        if config.get("check_endpoint", True):
            try:
                check_endpoint(config["base_url"], key, config.get("api_key_env"), config.get("model"),
                               min(float(config.get("timeout_s", 10)), 10.0))
            except ModelUnavailable as error:
                raise ConfigError(str(error)) from None


def check_accelerator(hw: Any) -> None:
    """``hardware.accelerator=gpu`` needs a visible CUDA device (as many as ``hardware.devices`` asks for).
    Keyed on the accelerator, not the strategy: DeepSpeed or FSDP on CPU processes stays possible."""
    if hw.device_type != "cuda":
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not visible:
        build = " (this torch is a CPU build)" if torch.version.cuda is None else ""
        on_cpu = f", or run {hw.name} on CPU processes with hardware.accelerator=cpu" \
            if hw.strategy not in ("auto", None) else ""
        raise ConfigError(f"hardware.accelerator={hw.accelerator} (hardware={hw.name}): no CUDA device is visible "
                          f"on this machine{build}. Use hardware=cpu{on_cpu}")
    wanted = max(hw.devices) + 1 if isinstance(hw.devices, list) else hw.devices
    if isinstance(wanted, int) and wanted > visible:
        raise ConfigError(f"hardware.devices={hw.devices} (hardware={hw.name}): {visible} CUDA device"
                          f"{'s' * (visible != 1)} visible on this machine")


def check_writable(path: str | os.PathLike, key: str, setting: str | None = None) -> None:
    """``path`` is a folder this process can write in, or one it can create (nothing is created).
    ``setting``: how the message shows it, where ``path`` is derived from the key's value (a file's folder)."""
    folder = Path(path).expanduser()
    where = setting or f"{key}={path}"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    fix = f"choose another {key}"
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{where}: {existing} is a file, so no folder can be made there; {fix}")
    if existing == folder:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ConfigError(f"{where}: cannot write in {folder} ({error.strerror}); {fix}") from None
    elif existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot create {folder} (no write permission in {existing}); {fix}")


def check_eval_data(task: Any, eval_args: Any) -> None:
    """The evaluation's data: the held-out prompts (and their references where the win rate's baseline is
    the dataset's), and the held-out rankings of the preference accuracy: an error where
    ``eval.preference_split`` names them, else a warning that the metric will be skipped."""
    try:
        examples = task.eval_examples()
    except AlignexpError as error:
        raise in_context(error, "evaluation data (eval.enabled=false skips evaluation)") from None
    if not examples:
        raise NoExamples(f"task {task.name}: no evaluation examples (eval.enabled=false skips evaluation)")
    baseline = eval_args.baseline if eval_args.baseline != "auto" else \
        ("reference" if task.has_gold_reward else "dataset")
    if baseline == "dataset" and not all(ex.responses or ex.target is not None for ex in examples):
        raise ConfigError(f"eval.baseline=dataset: task {task.name} has no reference responses")
    if not eval_args.preference_accuracy or task.samples_preferences:
        return
    try:
        task.preference_examples(eval_args.preference_split or task.eval_split)
    except (DataUnavailable, NotImplementedError) as error:
        if eval_args.preference_split is not None:
            raise in_context(error, f"eval.preference_split={eval_args.preference_split}") from None
        log.warning("preference accuracy will be skipped (eval.preference_accuracy): %s", error)


def in_context(error: Exception, context: str) -> Exception:
    """``error`` (same class, attributes and exit status) with ``context: `` before its message."""
    framed = type(error).__new__(type(error))
    framed.__dict__.update(error.__dict__)
    framed.args = (f"{context}: {error}",)
    framed.core = getattr(error, "core", str(error))  # the problem itself, whatever context frames it
    return framed
