"""Seeded sampling and pruning: every trial's suggestions come from its own seed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.config import StudyConfig
from mapnet_tune.recipe import trial_seed


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study file's sampler, seeded per trial.

    Each one lets several workers share a study: TPE with the constant liar (a running trial
    counts as a bad result, so that workers do not all propose the same point), the GP with
    its batch acquisition (q-logEI over the running trials), CMA-ES by drawing the members
    of one generation, and random search needs nothing. ``n_startup_trials`` random trials
    come first for the three that model the objective; the config refuses CMA-ES on a space
    with a categorical parameter, which it cannot sample.
    """
    name, startup = study.sampler.name, study.sampler.n_startup_trials

    def make(seed: int) -> optuna.samplers.BaseSampler:
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)

    return TrialSeededSampler(make, study.sampler.seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler made anew for every trial, seeded from the study seed and the trial number.

    One seeded stream per worker would make workers that share a study propose the same
    parameters, and a resumed study repeat its first proposals. Per-trial seeds give each
    trial its own stream, whichever worker runs it. Optuna's samplers keep no state between
    trials but their random state (the history comes from the storage), so nothing is lost.

    Args:
        make: Builds the underlying sampler from a seed.
        seed: The study seed.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Seed a fresh sampler for ``trial``."""
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        """As the underlying sampler."""
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict
    ) -> dict[str, Any]:
        """As the underlying sampler."""
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        """As the underlying sampler."""
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        """As the underlying sampler."""
        self._inner.after_trial(study, trial, state, values)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The study file's pruner; its resources are epochs."""
    p = study.pruner
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource,
            max_resource=study.train.epochs,
            reduction_factor=p.reduction_factor,
        )
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()
