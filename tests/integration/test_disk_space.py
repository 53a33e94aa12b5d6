"""No result lost to a full disk: preflight refuses a run whose run folder cannot hold what it will write,
naming the folder, the free space and the need; a save that fails anyway leaves no partial ``policy/`` and
names the checkpoint to save from (alignexp/disk.py, :func:`alignexp.pipeline.fit.save_policy`)."""

from __future__ import annotations

import errno

import pytest

import alignexp.disk as disk
import alignexp.pipeline.fit as fit_module
from alignexp.errors import ConfigError
from alignexp.pipeline.fit import PolicyNotSaved
from alignexp.train import run


def test_preflight_refuses_a_run_folder_that_cannot_hold_the_policy(compose, tmp_path, monkeypatch):
    out = tmp_path / "small"
    monkeypatch.setattr(disk, "free_bytes", lambda path: 400 * 1024 if str(path).startswith(str(out)) else 1 << 40)
    # the cache is elsewhere (plenty of room): only the run folder is short
    monkeypatch.setattr(disk, "_device", lambda path: 1 if str(path).startswith(str(out)) else 2)
    with pytest.raises(ConfigError) as refused:
        run(compose("debug=fast", f"paths.output_dir={out}"))
    message = str(refused.value)
    assert message.startswith("paths.output_dir: the run will write about ") and str(out) in message
    assert "the trained policy" in message and "that file system has 0.4 MiB free" in message
    assert not out.exists()  # refused before anything was written


def test_the_need_counts_the_policy_checkpoints_and_an_sft_policy_to_train(compose, tmp_path):
    """The tiny model (2 layers, hidden 128, 259-token vocabulary) in fp32: 2 x (4 x 128^2 + 3 x 128 x 256
    + 2 x 128) + 128 + 2 x 259 x 128 = 2 x 213,248 + 128 + 66,304 = 492,928 parameters, 1,971,712 bytes;
    the estimate counts the preset's architecture at a 512-token vocabulary: 557,696 parameters."""
    from alignexp.config import build_task, validate

    args = validate(compose("debug=fast", "train.checkpoint_every=5", f"paths.cache_dir={tmp_path / 'empty'}"))
    writes = {what: need for _, what, need in disk.planned_writes(args, build_task(args.task))}
    params = 2 * (4 * 128 ** 2 + 3 * 128 * 256 + 2 * 128) + 128 + 2 * 512 * 128
    assert writes["the trained policy"] == params * 4
    assert writes["training checkpoints"] == params * 4 + params * 12
    assert writes["the task's SFT policy (cache)"] == params * 4
    assert "the PPO checkpoint" not in writes
    # PPO always writes its last checkpoint: the policy's weights and AdamW's two fp32 moments (the value head is
    # a few hundred parameters, inside the margin); a critic doubles it. SmolLM2-135M: 0.54 + 1.08 = 1.6 GB.
    for value_model, models in (("head", 1), ("critic", 2)):
        ppo = validate(compose("debug=fast", "loss=ppo", f"ppo.value_model={value_model}"))
        writes = {what: need for _, what, need in disk.planned_writes(ppo, build_task(ppo.task))}
        assert writes["the PPO checkpoint"] == models * (params * 4 + params * 8)


def test_a_failed_save_leaves_no_partial_policy_and_names_the_checkpoint(compose, tmp_path, monkeypatch):
    original = fit_module.write_policy

    def full_disk(model, tokenizer, folder):
        if folder.name.startswith(".policy."):  # the run's policy, not the SFT policy in the cache
            (folder / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(model, tokenizer, folder)

    monkeypatch.setattr(fit_module, "write_policy", full_disk)
    out = tmp_path / "run"
    with pytest.raises(PolicyNotSaved) as failed:
        run(compose("debug=fast", "train.checkpoint_every=1", f"paths.output_dir={out}"))
    message = str(failed.value)
    assert f"could not be saved to {out / 'policy'} (No space left on device); nothing partial" in message
    assert f"in the checkpoint {out / 'checkpoints' / 'train' / 'last.ckpt'}" in message
    assert f"resume={out}" in message
    assert not (out / "policy").exists() and not list(out.glob(".policy*"))
