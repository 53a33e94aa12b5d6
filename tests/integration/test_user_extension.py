"""A user's own loss and stage, in a folder outside alignexp/, trained through the CLI without editing alignexp:
the module is imported by `imports=[...]` and its config found through `--config-dir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from alignexp.config import validate
from tests.conftest import REPO

USER_MODULE = '''
"""A user's loss: DPO with a target margin gamma (as SimPO adds one), and a stage that wraps the preference stage."""
import torch.nn.functional as F

from alignexp.losses import LossOutput, register_loss
from alignexp.pipeline import get_stage, register_stage


@register_loss("margin_dpo", needs_reference=True, stage="margin_preference")
def margin_dpo(policy_logps, ref_logps=None, lengths=None, rewards=None, mask=None, *, beta: float = 0.1,
               gamma: float = 0.5):
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)) - gamma) on (chosen, rejected) pairs."""
    h = beta * ((policy_logps[:, 0] - ref_logps[:, 0]) - (policy_logps[:, 1] - ref_logps[:, 1])) - gamma
    loss = -F.logsigmoid(h).mean()
    return LossOutput(loss, {"margin": h.detach().mean()})


@register_stage("margin_preference", ranks="as the preference stage")
def margin_preference(ctx):
    """The preference stage, then a note in the run folder that this stage ran."""
    get_stage("preference").run(ctx)
    (ctx.out / "margin_stage.txt").write_text(f"trained {ctx.spec.name}")
'''


def test_a_loss_and_stage_from_outside_the_package_train_through_the_cli(tmp_path, cache_dir):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "loss" / "margin_dpo.yaml").write_text("name: margin_dpo\nbeta: 0.1\ngamma: 0.5\n")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the checkout's alignexp; my_losses from the working folder
    result = subprocess.run(
        [sys.executable, "-m", "alignexp.train", "--config-dir", str(tmp_path / "conf"), "loss=margin_dpo",
         "imports=[my_losses]", "debug=fast", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "margin_stage.txt").read_text() == "trained margin_dpo"
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["loss"] == "margin_dpo" and record["hparams"] == {"beta": 0.1, "gamma": 0.5}
    assert (run_dir / "policy" / "config.json").exists()
    metrics = (run_dir / "logs" / "train" / "metrics.csv").read_text()
    assert "train/margin" in metrics.splitlines()[0]
    assert not any(Path(REPO, "alignexp").rglob("my_losses*"))  # nothing was added to the package


def test_an_unknown_import_names_the_key(tmp_path):
    result = subprocess.run([sys.executable, "-m", "alignexp.train", "imports=[no_such_module_xyz]",
                             f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "imports: cannot import 'no_such_module_xyz'" in result.stderr and "Traceback" not in result.stderr


def test_a_users_experiment_and_loss_option_are_found_through_hydra_searchpath(compose, tmp_path):
    """The other way to add a config folder: `hydra.searchpath=[file://...]`, after alignexp's own config tree
    (as `--config-dir` is), so its files add options under new names."""
    (tmp_path / "conf" / "loss").mkdir(parents=True)
    (tmp_path / "conf" / "experiment").mkdir()
    (tmp_path / "conf" / "loss" / "dpo_strong.yaml").write_text("name: dpo\nbeta: 0.5\n")
    (tmp_path / "conf" / "experiment" / "my_study.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: dpo_strong\nrun_name: my_study\npairs: adjacent\n")
    args = validate(compose(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=my_study"))
    assert (args.loss.name, args.loss.hparams["beta"], args.pairs, args.run_name) == ("dpo", 0.5, "adjacent",
                                                                                       "my_study")
