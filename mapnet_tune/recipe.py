"""The recipe: how a trial's parameters become a model, its training settings, its augmentation
and the window and stride it is scored with.

The only code that does this; search and retrain-best both call it, so a configuration means
the same thing in a trial, in a cross-validation fold and in the registered model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna
import torch

from mapnet_tune.config import RecipeConfig, StudyConfig
from mapnet_tune.data import Split
from mapnet_tune.data.augment import Augment, BatchAugment, augmentation_for
from mapnet_tune.engine import Evaluation, TrainSettings
from mapnet_tune.model import MAPNet

#: The sliding window of a model trained on whole images (it is only used with patches).
DEFAULT_WINDOW = 64


def trial_seed(study_seed: int, number: int) -> int:
    """The seed of every random choice in one trial."""
    return (study_seed * 1_000_003 + number) % (2**31 - 1)


def search_distributions(study: StudyConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every searched hyperparameter, as :func:`suggest` samples it."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in study.space:
        if p.kind == "categorical":
            out[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.kind == "int":
            out[p.name] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
        elif p.kind == "float":
            out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    return out


def suggest(trial: optuna.Trial | optuna.trial.FixedTrial, study: StudyConfig) -> dict[str, Any]:
    """The trial's hyperparameters: sampled where the study searches, fixed elsewhere."""
    params: dict[str, Any] = {p.name: p.value for p in study.space if p.kind == "fixed"}
    for name, dist in search_distributions(study).items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return {p.name: params[p.name] for p in study.space}


def build_model(study: StudyConfig, channels: int) -> MAPNet:
    """A freshly initialised MAP-Net as the study file describes it."""
    return MAPNet(
        in_channels=channels,
        out_channels=1,
        width=study.model.width,
        head_interpolation=study.model.head_interpolation,
        bn_momentum=study.model.bn_momentum,
    )


def augmentation(
    params: dict[str, Any], channels: int, seed: int, device: torch.device
) -> Augment | BatchAugment | None:
    """The augmentation the parameters ask for, batched on CUDA (see ``augmentation_for``)."""
    return augmentation_for(params, channels, seed, device)


def _evaluation(protocol: str, train: Split, stride: int, batch_size: int) -> Evaluation:
    """An evaluation whose sliding windows are the size of the training patches."""
    return Evaluation(
        protocol=protocol,
        window=train.patch_size or DEFAULT_WINDOW,
        stride=stride,
        batch_size=batch_size,
    )


def _settings(
    study: StudyConfig, params: dict[str, Any], seed: int, **schedule: Any
) -> TrainSettings:
    """Training settings: the hyperparameters the optimiser and the loss take from ``params``
    (the one place that maps them, for trials and retraining alike), the study's objective,
    and the ``schedule`` (epochs, batch, evaluation, ...) of the caller."""
    return TrainSettings(
        lr=params["lr"],
        pos_weight=params["pos_weight"],
        weight_decay=params["weight_decay"],
        objective=study.objective.metric,
        maximize=study.objective.direction == "maximize",
        seed=seed,
        precise_bn_batches=study.train.precise_bn_batches,
        **schedule,
    )


def search_evaluation(study: StudyConfig, train: Split) -> Evaluation:
    """How trials are validated: the study's protocol, windows the size of the patches."""
    t = study.train
    return _evaluation(t.eval_protocol, train, t.eval_stride, t.eval_batch_size)


def search_settings(
    study: StudyConfig, params: dict[str, Any], seed: int, train: Split
) -> TrainSettings:
    """A trial's training settings: validated every epoch, for pruning."""
    return _settings(
        study,
        params,
        seed,
        epochs=study.train.epochs,
        batch_size=int(params["batch_size"]),
        max_seconds=study.train.max_minutes * 60 if study.train.max_minutes else None,
        steps_per_epoch=study.train.steps_per_epoch,
        evaluation=search_evaluation(study, train),
    )


@dataclass(frozen=True)
class Retraining:
    """One retrain recipe applied to one trial's parameters.

    The same object trains every cross-validation fold and the registered model, so the
    cross-validated score is an estimate for exactly the model that is registered.

    Attributes:
        study: The study file.
        name: The recipe's name (``default`` or a variant of the ``retrain`` section).
        recipe: Its settings.
        params: The trial's hyperparameters.
        seed: The trial's seed.
    """

    study: StudyConfig
    name: str
    recipe: RecipeConfig
    params: dict[str, Any]
    seed: int

    @property
    def batch_size(self) -> int:
        """The trial's batch times the recipe's batch scale, at least 1."""
        return max(1, round(int(self.params["batch_size"]) * self.recipe.batch_scale))

    def training_view(self, split: Split) -> Split:
        """What the model trains on: whole images (``full``) or the split's patches (``crop``).

        Raises:
            ValueError: ``crop`` on a split without patches.
        """
        if self.recipe.resolution == "full":
            return dataclasses.replace(split, patches=None, patch_size=None)
        if split.patches is None:
            raise ValueError(
                f"recipe '{self.name}' trains on crops but the dataset makes whole images; "
                f"use resolution: full, or dataset_options that make patches"
            )
        return split

    def evaluation(self, train: Split) -> Evaluation:
        """How the model is scored and used: windows the size of the training crops."""
        r = self.recipe
        return _evaluation(r.protocol, train, r.eval_stride, r.eval_batch_size)

    def served_evaluation(self, train: Split, threshold: float) -> Evaluation:
        """How the registered model is scored on test and used by ``evaluate`` and ``predict``:
        the recipe's test stride and the chosen threshold."""
        r = self.recipe
        return dataclasses.replace(
            self.evaluation(train), stride=r.test_stride or r.eval_stride, threshold=threshold
        )

    def settings(self, train: Split) -> TrainSettings:
        """Training settings for ``train`` (already in its training view)."""
        return _settings(
            self.study,
            self.params,
            self.seed,
            epochs=self.recipe.epochs,
            batch_size=self.batch_size,
            evaluation=self.evaluation(train),
            val_every=self.recipe.val_every,
        )

    def augmentation(self, channels: int, device: torch.device) -> Augment | BatchAugment | None:
        """The trial's augmentation, seeded from the trial."""
        return augmentation(self.params, channels, self.seed, device)

    @property
    def weights(self) -> str:
        """Which weights are kept, and why: for the model card."""
        bn = (
            f"; BatchNorm statistics re-estimated over {self.study.train.precise_bn_batches} "
            f"training batches at the end"
            if self.study.train.precise_bn_batches
            else ""
        )
        return (
            f"the final weights after {self.recipe.epochs} epochs, as in every validation "
            f"run of this recipe, so that the validation score estimates this model (an epoch "
            f"picked on the held-out data would bias that score){bn}"
        )


def describe_training(split: Split) -> str:
    """``256x256 patches`` or ``584x565 whole images``: what the model sees while training."""
    if split.patch_size is not None:
        return f"{split.patch_size}x{split.patch_size} patches"
    _, _, height, width = split.images.shape
    return f"{height}x{width} whole images"
