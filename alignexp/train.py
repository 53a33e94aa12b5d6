"""``python -m alignexp.train``: compose the config, check it, build the task, run the pipeline's stages.

With no overrides it runs the default experiment (on the CPU on a machine without CUDA; ``hardware=auto``
says what it chose): the synthetic task's SFT policy (trained and cached when missing), rankings
sampled from it and labelled by the gold reward, ranked DPO from it, and evaluation of policy against
reference on held-out prompts. Which stages run is declared by the loss and the sampler
(alignexp/pipeline/). On N processes they are launched once, before the first stage
(:mod:`alignexp.scale.launch`). ``resume=<run folder>`` continues that run in its folder, with its config,
from its checkpoints (:func:`alignexp.pipeline.fit.fit`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from alignexp.config import CONF_DIR, build_task, setup_runtime, validate
from alignexp.errors import ConfigError, run_cli


def resumed_config(cfg: DictConfig) -> DictConfig:
    """The config a run folder was started with (its ``config.yaml``), to continue it there."""
    folder = Path(str(cfg.resume)).expanduser().resolve()
    saved = folder / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={cfg.resume}: no run there (no {saved})")
    loaded = OmegaConf.load(saved)
    loaded.resume = str(folder)
    loaded.paths.output_dir = str(folder)
    return loaded


def run(cfg: DictConfig) -> dict:
    """The whole experiment for a composed config: checked (its settings, ``hardware=auto`` resolved, then
    every input it will need, before any model is built: :mod:`alignexp.preflight`), launched once on its
    processes (:mod:`alignexp.scale.launch`), then the stages; returns the eval.json record."""
    from alignexp.distributed import barrier, is_main
    from alignexp.pipeline import run as run_pipeline
    from alignexp.preflight import preflight_train
    from alignexp.scale.hardware import resolve_auto
    from alignexp.scale.launch import launched, quiet_unless_main
    from alignexp.sweeps import previous_result

    quiet_unless_main()
    done = previous_result()
    if done is not None:  # a rerun of a sweep: this job completed before
        print(f"[alignexp] this sweep job completed before ({cfg.paths.output_dir}): skipped", flush=True)
        return done
    if cfg.get("resume"):
        cfg = resumed_config(cfg)
    args = resolve_auto(validate(cfg))
    task = build_task(args.task)
    preflight_train(args, task)
    setup_runtime(args.seed, args.hardware.threads, verbose=bool(cfg.get("verbose", False)))
    with launched(args.hardware):
        if is_main():
            args.output_dir.mkdir(parents=True, exist_ok=True)
            if not args.resume:
                OmegaConf.save(cfg, Path(args.output_dir) / "config.yaml", resolve=True)
        barrier()
        return run_pipeline(args, task)


def _main(cfg: DictConfig) -> float | None:
    """One run; returns its objective (:mod:`alignexp.tuning`), the number an Optuna sweep maximises."""
    from alignexp.tuning import Objective, objective_for_sweeper

    objective = run_cli(Objective.from_config, OmegaConf.to_container(cfg.get("objective") or {}, resolve=True))
    return run_cli(objective_for_sweeper, objective, run_cli(run, cfg))


def main() -> None:
    """The Hydra entry point. ``resume=<folder>`` runs Hydra in that folder, leaving its ``.hydra`` as it was."""
    folders = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("resume=")]
    if folders and folders[-1] not in ("", "null") and not any(a.startswith("hydra.run.dir=") for a in sys.argv):
        sys.argv += [f"hydra.run.dir={folders[-1]}", "hydra.output_subdir=null"]
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")(_main)()


if __name__ == "__main__":
    main()
