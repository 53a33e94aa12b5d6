"""``python -m alignexp.train``: compose the config, check it, build the task, run the pipeline's stages.

With no overrides it runs the default experiment on CPU: the synthetic task's SFT policy (trained and
cached when missing), rankings sampled from it and labelled by the gold reward, ranked DPO from it, and
evaluation of policy against reference on held-out prompts. Which stages run is declared by the loss
and the sampler (alignexp/pipeline/).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from alignexp.config import CONF_DIR, build_task, setup_runtime, validate
from alignexp.errors import run_cli


def run(cfg: DictConfig) -> dict:
    """The whole experiment for a composed config: checked (its settings, then every input it will need,
    before any model is built: :mod:`alignexp.preflight`), then the stages; returns the eval.json record."""
    from alignexp.pipeline import run as run_pipeline
    from alignexp.preflight import preflight_train
    from alignexp.sweeps import previous_result

    done = previous_result()
    if done is not None:  # a rerun of a sweep: this job completed before
        print(f"[alignexp] this sweep job completed before ({cfg.paths.output_dir}): skipped", flush=True)
        return done
    args = validate(cfg)
    task = build_task(args.task)
    preflight_train(args, task)
    setup_runtime(args.seed, args.hardware.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(args.output_dir) / "config.yaml", resolve=True)
    return run_pipeline(args, task)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    record = run_cli(run, cfg)
    return (record.get("policy") or {}).get("gold_reward")


if __name__ == "__main__":
    main()
