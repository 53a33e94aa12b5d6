"""Shared test setup: offline, 2 threads, a session cache for the synthetic SFT policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# Short schedules and small evaluations (conf/debug/fast.yaml, with a small synthetic task where it is the
# task): enough to exercise every stage in seconds.
TINY_SCHEDULE = ["debug=fast"]
TINY_RUN = TINY_SCHEDULE


def allocated_bytes_over_time(fn) -> list[int]:
    """Run ``fn`` under the torch profiler; the CPU bytes it has allocated (and not freed) after each
    allocator event, relative to the start, in time order."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return [e["args"]["Total Allocated"] - start for e in memory]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for every test: the tiny model's matrices gain nothing from a second thread,
    and on a 2-core machine that is busy with anything else, two threads are many times slower."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache per test session, so the synthetic SFT policy is trained once."""
    return tmp_path_factory.mktemp("alignexp-cache")


@pytest.fixture
def compose(cache_dir, tmp_path):
    """Compose conf/train.yaml with overrides, outside a Hydra run (paths given explicitly)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from alignexp.config import CONF_DIR

    def _compose(*overrides: str, config_name: str = "train", return_hydra_config: bool = False):
        paths = [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}"] \
            if config_name in ("train", "sample") else []
        if config_name == "sample":
            paths.append(f"output={tmp_path / 'samples.jsonl'}")
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=[*paths, *overrides],
                                 return_hydra_config=return_hydra_config)

    return _compose


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each test sees the log as a fresh run would: what alignexp.logs.log_once said in an earlier test is
    said again, and what an in-process Hydra run's logging config left behind (disabled loggers, the root
    logger at ERROR) is undone."""
    import logging

    import alignexp.logs

    alignexp.logs._LOGGED.clear()
    if logging.getLogger().level > logging.WARNING:  # an in-process Hydra run leaves the root logger at ERROR
        logging.getLogger().setLevel(logging.WARNING)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("alignexp") and isinstance(logger, logging.Logger):
            logger.disabled = False
    yield
