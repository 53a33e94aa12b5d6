"""``hydra/sweeper=optuna`` for alignexp (conf/hydra/sweeper/optuna.yaml): hydra-optuna-sweeper's sweeper, which
resumes a study from its sweep folder (:mod:`alignexp.tuning`).

Hydra loads sweepers from the ``hydra_plugins`` namespace only, so the class lives here. A rerun of a sweep
with the same ``hydra.sweep.dir`` hands Optuna the trials that completed there (``study.add_trial``), runs
only the rest of ``n_trials``, and numbers their jobs after the folder's last, so no job folder is written
twice. This needs no database: optuna 2.x's RDB storage (``hydra.sweeper.storage=sqlite:///...``) does not
work with SQLAlchemy 2, and a study's trials are all in its folder anyway. With a storage set, the study
is loaded from it instead, as hydra-optuna-sweeper does.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _impl_class():
    """The resuming subclass of hydra-optuna-sweeper's implementation (imported when a sweep starts)."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides

    from alignexp.tuning import Objective, sweep_trials

    class ResumingImpl(OptunaSweeperImpl):
        def sweep(self, arguments: list[str]) -> None:
            if self.storage is None:
                self._resume(arguments)
            return super().sweep(arguments)

        def _resume(self, arguments: list[str]) -> None:
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            self._process_searchspace_config()
            params_conf = self._parse_sweeper_params_config() + list(arguments)
            distributions, fixed = create_params_from_overrides(params_conf)
            distributions = {**(self.search_space_distributions or {}), **distributions}
            for name in fixed:
                distributions.pop(name, None)
            objective = Objective.from_config(OmegaConf.to_container(self.config.get("objective") or {}))
            trials = sweep_trials(sweep_dir, sorted(distributions), objective) if sweep_dir.is_dir() else []
            name = self.study_name or "alignexp"
            storage = optuna.storages.InMemoryStorage()
            study = optuna.create_study(study_name=name, storage=storage, directions=self._get_directions())
            resumed = 0
            with warnings.catch_warnings():  # create_trial is "experimental" in optuna 2.x
                warnings.simplefilter("ignore")
                for trial in trials:
                    resumed += self._add(study, trial, distributions, sweep_dir)
            if trials:
                self.job_idx = max(t.number for t in trials) + 1
                log.info("resuming study '%s' from %s: %d completed trials, %d to run", name, sweep_dir, resumed,
                         max(0, self.n_trials - resumed))
            self.n_trials = max(0, self.n_trials - resumed)
            self.storage, self.study_name = storage, name
            if resumed:
                self._reseed(resumed)

        @staticmethod
        def _add(study, trial, distributions, sweep_dir) -> int:
            if trial.state != "COMPLETE" or set(trial.params) != set(distributions):
                return 0
            try:
                params = {k: _parse(v, distributions[k]) for k, v in trial.params.items()}
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                          value=trial.value))
                return 1
            except ValueError as error:  # a value outside a changed search space: left out
                log.warning("trial %d of %s not resumed: %s", trial.number, sweep_dir, error)
                return 0

        def _reseed(self, resumed: int) -> None:
            """A seeded sampler restarted would propose its first trials again: seed it past the resumed ones
            (seed + their count), deterministically where the sampler keeps its generators as optuna 2.x's do."""
            import numpy as np

            seed = OmegaConf.select(self.config, "hydra.sweeper.sampler.seed")
            samplers = [self.sampler, getattr(self.sampler, "_random_sampler", None)]
            if seed is None or not all(s is None or hasattr(s, "_rng") for s in samplers):
                self.sampler.reseed_rng()
                return
            for sampler in samplers:
                if sampler is not None:
                    sampler._rng = np.random.RandomState(int(seed) + resumed)

    return ResumingImpl


def _parse(text: str, distribution: Any) -> Any:
    """An override's text as the value ``distribution`` holds (int, float, or one of its choices)."""
    import optuna

    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        for choice in distribution.choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{text!r} is not one of {distribution.choices}")
    if isinstance(distribution, (optuna.distributions.IntUniformDistribution,
                                 optuna.distributions.IntLogUniformDistribution)):
        return int(text)
    return float(text)


class AlignexpOptunaSweeper(Sweeper):
    """hydra-optuna-sweeper's ``OptunaSweeper`` whose sweep resumes from its folder (see the module docstring)."""

    def __init__(self, sampler: Any, direction: Any, storage: Any | None, study_name: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float, search_space: DictConfig | None,
                 custom_search_space: str | None, params: DictConfig | None) -> None:
        self.sweeper = _impl_class()(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                                     search_space, custom_search_space, params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
