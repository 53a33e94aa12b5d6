"""``hardware.precision=bf16-mixed`` end to end (debug=fast: SFT policy, sampling, reference precompute, 2 preference
steps, save, evaluation) on one CPU process and on 2 under DDP, FSDP2 and ZeRO-3, with the numbers DESIGN.md keeps
in fp32 read during the steps by tests/distributed/bf16_probe.py: the summed log-probs, the batch's precomputed
reference log-probs and rewards (after the precision plugin's conversion of the batch), the weights the optimizer
steps and its moments; and the compute really in bf16 (the output head's logits).

Which conversion applies: Lightning's ``bf16-mixed`` plugin (``MixedPrecision``) leaves a batch as it is and
autocasts the compute; under FSDP2 the Trainer runs ``32-true`` (no conversion) and ``MixedPrecisionPolicy``
casts the parameters to bf16 for the compute; DeepSpeed's plugin (and ``bf16-true``'s) converts every float
of the batch to bf16, except the reference log-probs and rewards (``alignexp.scale.strategies.FULL_PRECISION_FIELDS``);
tests/unit/test_hardware.py checks those plugins on a batch directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.distributed.conftest import FAST, check, only_file, train, weights

PROBE = str(REPO / "tests" / "distributed" / "bf16_probe.py")
TWO_RANKS = ["hardware.accelerator=cpu", "hardware.devices=2", "hardware.threads=1"]
KINDS = {
    "cpu": ["hardware=cpu"],
    "ddp": ["hardware=ddp", *TWO_RANKS],
    "fsdp": ["hardware=fsdp", *TWO_RANKS],
    "zero3": ["hardware=deepspeed_zero3", "hardware.zero_persistence_threshold=0", *TWO_RANKS],
}
# How the compute reaches bf16: autocast (one device, DDP), FSDP2's MixedPrecisionPolicy (bf16 copies of the
# fp32 shards), DeepSpeed's bf16 module (its optimizer holds the fp32 master partitions).
AUTOCAST = {"cpu": True, "ddp": True, "fsdp": False, "zero3": False}
MODULE_PARAMS = {"cpu": ["float32"], "ddp": ["float32"], "fsdp": ["float32"], "zero3": ["bfloat16"]}


def probe_run(tmp_path: Path, kind: str) -> dict[int, list[dict]]:
    """The default experiment in bf16-mixed under ``kind``; checks it ran to its end and saved a trained fp32
    policy; returns each rank's probe records."""
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    out, cache, folder = tmp_path / "run", tmp_path / "cache", tmp_path / "probe"
    check(train(*FAST, *KINDS[kind], "hardware.precision=bf16-mixed", f"hydra.run.dir={out}", cache=cache,
                script=PROBE, env={"BF16_PROBE": str(folder)}))
    record = json.loads((out / "eval.json").read_text())
    assert record["n_prompts"] > 0 and record["policy"]
    saved, start = weights(out / "policy"), weights(only_file(cache / "sft", "config.json").parent)
    assert all(v.dtype == torch.float32 for v in saved.values())  # model.dtype of the tiny model
    assert any(not torch.equal(saved[k], start[k]) for k in saved)  # trained
    return {int(p.stem.removeprefix("rank")): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("rank*.jsonl"))}


@pytest.mark.parametrize("kind", [
    "cpu",
    pytest.param("ddp", marks=pytest.mark.slow),
    pytest.param("fsdp", marks=pytest.mark.slow),
    pytest.param("zero3", marks=pytest.mark.slow),
])
def test_bf16_mixed_runs_end_to_end_and_keeps_the_fp32_numbers(tmp_path, kind):
    records = probe_run(tmp_path, kind)
    assert sorted(records) == ([0] if kind == "cpu" else [0, 1])  # every rank trained
    for rank, rows in records.items():
        steps = [r for r in rows if "policy_logps" in r]
        updates = [r for r in rows if "master" in r]
        assert len(steps) == len(updates) == 2, (rank, rows)  # train.max_steps=2 (debug=fast)
        for row in steps:
            assert row["head_output"] == ["bfloat16"], row  # the compute is bf16 ...
            assert row["autocast"] is AUTOCAST[kind], row
            # ... and the sums, the precomputed reference log-probs and the rewards are fp32
            assert row["policy_logps"] == row["ref_logps"] == row["rewards"] == ["float32"], row
        for row in updates:
            assert row["master"] == row["adam_state"] == ["float32"], row  # fp32 master weights and moments
            assert row["module_params"] == MODULE_PARAMS[kind], row


@pytest.mark.parametrize("strategy, precision, converts", [
    ("auto", "bf16-mixed", False), ("ddp", "bf16-mixed", False), ("fsdp", "bf16-mixed", False),
    ("deepspeed", "bf16-mixed", True), ("auto", "bf16-true", True), ("ddp", "bf16-true", True),
])
def test_which_precision_plugin_converts_a_batch_and_that_reference_log_probs_and_rewards_stay_fp32(
        strategy, precision, converts):
    """The plugin the hardware group gives the Trainer, on a packed batch (the training loop's ``convert_input(batch)``)
    and on a plain float tensor: only
    DeepSpeed's and ``*-true``'s convert batches (to bf16), and they leave ``ref_logps`` and ``rewards`` fp32."""
    import lightning as L

    from alignexp.args import HardwareArgs
    from alignexp.models.logprobs import EncodedExample, pack
    from alignexp.scale.hardware import precision_settings

    hw = HardwareArgs(name=strategy, accelerator="cpu", devices=1, strategy=strategy, precision=precision,
                      **({"zero_stage": 3} if strategy == "deepspeed" else {}))
    settings = precision_settings(hw)
    plugin = (settings["plugins"][0] if "plugins" in settings else
              L.Trainer(accelerator="cpu", devices=1, precision=settings["precision"], logger=False).precision_plugin)
    batch = pack([EncodedExample([1, 2], [[3, 4], [5]], scores=[1.25, -0.5])], n=2)
    batch.ref_logps = torch.tensor([[-301.37, -12.0]])
    converted, other = plugin.convert_input(batch), plugin.convert_input(torch.tensor([-301.37]))  # as the loop does
    assert other.dtype == (torch.bfloat16 if converts else torch.float32)
    assert converted.ref_logps.dtype == converted.rewards.dtype == torch.float32
    assert converted.ref_logps.tolist() == [[pytest.approx(-301.37), -12.0]]  # not rounded to bf16's step of 2
    assert converted.rewards.tolist() == [[1.25, -0.5]] and converted.input_ids.dtype == torch.long
