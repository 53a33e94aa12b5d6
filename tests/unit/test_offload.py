"""DeepSpeed's CPU Adam for ZeRO optimizer offload (alignexp/scale/offload.py): the offload strategy hands DeepSpeed
a ``DeepSpeedCPUAdam`` that steps exactly as the modules' torch AdamW would, also inside a ZeRO-3 engine
with parameters and optimizer offloaded (DeepSpeed's CPU accelerator, one process over gloo). The tests that
need the compiled op are slow: DeepSpeed builds it at first use (about 1.5 minutes on 2 cores)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alignexp.scale.hardware import HardwareArgs, build_strategy
from alignexp.scale.offload import CPUAdamDeepSpeedStrategy, cpu_adam_like

REPO = Path(__file__).resolve().parents[2]


def test_the_offload_strategy_is_the_cpu_adam_one():
    hw = HardwareArgs(strategy="deepspeed", zero_stage=3, offload_optimizer=True, offload_parameters=True)
    strategy = build_strategy(hw)
    assert isinstance(strategy, CPUAdamDeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    plain = build_strategy(HardwareArgs(strategy="deepspeed", zero_stage=3))
    assert not isinstance(plain, CPUAdamDeepSpeedStrategy)


def test_other_optimizers_pass_through_with_a_warning(monkeypatch, caplog):
    """SGD has no CPU Adam counterpart: DeepSpeed gets it unchanged, and the log says so."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    seen = {}
    monkeypatch.setattr(DeepSpeedStrategy, "_setup_model_and_optimizer",
                        lambda self, model, optimizer, lr_scheduler=None: seen.setdefault("optimizer", optimizer))
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    strategy = build_strategy(HardwareArgs(strategy="deepspeed", zero_stage=3, offload_optimizer=True))
    with caplog.at_level(logging.WARNING, logger="alignexp.scale.offload"):
        strategy._setup_model_and_optimizer(torch.nn.Linear(2, 2), sgd)
    assert seen["optimizer"] is sgd
    assert "steps with SGD on the CPU, not DeepSpeed's CPU Adam" in caplog.text
    with pytest.raises(TypeError, match="not SGD"):
        cpu_adam_like(sgd)


@pytest.mark.slow
def test_cpu_adam_steps_like_torch_adamw():
    """Two parameter groups (weight decay 0.1 and 0), a scheduler that halves the learning rate each step,
    three steps on the same gradients: the same weights as torch's AdamW, to float rounding."""
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    theirs.load_state_dict(ours.state_dict())

    def adamw(model):
        return torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                                  {"params": [model.bias], "weight_decay": 0.0}], lr=1e-2, betas=(0.8, 0.99))

    reference = adamw(theirs)
    adam = cpu_adam_like(adamw(ours))
    assert type(adam).__name__ == "DeepSpeedCPUAdam"
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step) for o in (adam, reference)]
    for _ in range(3):
        for model, optimizer in ((ours, adam), (theirs, reference)):
            model.zero_grad()
            model(torch.linspace(-1, 1, 16)).pow(2).sum().backward()
            optimizer.step()
        for schedule in schedules:
            schedule.step()
    assert adam.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == 1e-2 / 8
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


ZERO3_OFFLOAD = textwrap.dedent("""
    import os, torch, deepspeed
    from alignexp.scale.hardware import HardwareArgs, build_strategy
    from alignexp.scale.offload import cpu_adam_like
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    config = build_strategy(HardwareArgs(strategy="deepspeed", zero_stage=3, offload_optimizer=True,
                                         offload_parameters=True)).config
    config.update(train_micro_batch_size_per_gpu=1, zero_force_ds_cpu_optimizer=True)  # refuse torch's AdamW
    results = []
    for use_cpu_adam in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        if use_cpu_adam:
            optimizer = cpu_adam_like(optimizer)
        else:
            config["zero_force_ds_cpu_optimizer"] = False
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                          model_parameters=model.parameters(), dist_init_required=False)
        x = torch.linspace(-1, 1, 64).view(4, 16)
        for _ in range(3):
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            results.append([p.detach().clone() for p in model.parameters()])
        print(type(engine.optimizer.optimizer).__name__)
    print("max difference", max((a - b).abs().max().item() for a, b in zip(*results)))
""")


@pytest.mark.slow
def test_zero3_offload_steps_with_cpu_adam():
    """ZeRO-3 with parameters and optimizer offloaded, DeepSpeed's own check on (it refuses a client
    optimizer that is not its CPU Adam): three steps with the converted optimizer equal three with torch's
    AdamW under the same engine (DeepSpeed's CPU accelerator, one process over gloo)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29561", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ZERO3_OFFLOAD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-3:-1] == ["DeepSpeedCPUAdam", "AdamW"]
    assert float(lines[-1].split()[-1]) < 1e-6
