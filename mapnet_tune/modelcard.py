"""The model card: the typed record of a trained model.

retrain-best writes a card into every checkpoint and onto every registered version (as tags
and a Markdown description); predict, evaluate and report read it back. Nothing reads a
model's facts from a loose dict with guessed defaults.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mapnet_tune.engine import Evaluation
from mapnet_tune.names import FINGERPRINT_TAG, GIT_TAG, METRIC_TAG

#: Version tags the champion gate reads: the selection basis, and what rebuilds a candidate.
DIGEST_TAG, BASIS_TAG = "selection.digest", "selection.basis"
SEED_TAG, RECIPE_SETTINGS_TAG, TRAINING_DIGEST_TAG = "seed", "recipe.settings", "training.digest"


@dataclass(frozen=True)
class ModelCard:
    """What a registered model is, how it was trained and chosen, and how to use it.

    Attributes:
        dataset: Dataset name.
        fingerprint: Content fingerprint of the prepared data it was trained on.
        dataset_options: The options it was prepared with (search options, retrain's over them).
        preprocessing: The loader's resolved settings; ``predict`` prepares new images with them.
        study, trial: The search trial whose hyperparameters it uses.
        recipe: The retrain recipe's name (``default`` or a variant).
        params: Every hyperparameter it trained with.
        batch_size: The batch it trained with (the trial's, times the recipe's batch scale).
        epochs: Training epochs.
        training: What the model saw while training: ``584x565 whole images`` or
            ``256x256 patches``.
        trained_on: ``train+val`` or ``train``.
        weights: Which weights are kept, and why.
        evaluation: How it is scored and used (protocol, window, stride, threshold).
        selection_metric: The validation metric that chose it (``cv/val/iou_mean`` or
            ``val/iou``); never a test metric.
        selection_value: Its value.
        validation: Validation metrics: the cross-validated means and spreads, or the val
            split's numbers.
        folds: Cross-validation folds (0: the val split decided).
        test: Test metrics, scored once after every decision; empty without a test split.
        git_sha: The code it was trained with.
        seed: The seed of its training (and of its folds' training).
        recipe_settings: The recipe in full, so that its candidate can be trained again.
        training_digest: A digest of the study file's model, train and objective sections:
            what, besides the recipe and the parameters, a retraining depends on.
        selection_digest: The digest of the selection basis its numbers were measured on.
        selection_basis: A short hash per part of that basis (data, pool, folds, seed, ...).
        threshold_rule: How ``evaluation.threshold`` was chosen, in words.
    """

    dataset: str
    fingerprint: str
    dataset_options: dict[str, Any]
    preprocessing: dict[str, Any]
    study: str
    trial: int
    recipe: str
    params: dict[str, Any]
    batch_size: int
    epochs: int
    training: str
    trained_on: str
    weights: str
    evaluation: Evaluation
    selection_metric: str
    selection_value: float
    validation: dict[str, float] = field(default_factory=dict)
    folds: int = 0
    test: dict[str, float] = field(default_factory=dict)
    git_sha: str = "unknown"
    seed: int | None = None
    recipe_settings: dict[str, Any] = field(default_factory=dict)
    training_digest: str = ""
    selection_digest: str = ""
    selection_basis: dict[str, str] = field(default_factory=dict)
    threshold_rule: str = "fixed at 0.5"

    def with_test(self, metrics: dict[str, float]) -> ModelCard:
        """The same card with its single test score."""
        return replace(self, test={k: v for k, v in metrics.items() if math.isfinite(v)})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        """Read a card written by :meth:`to_dict`.

        Raises:
            ValueError: A missing or unknown field.
        """
        fields = {**raw, "evaluation": Evaluation(**raw["evaluation"])}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"not a model card: {exc}") from None

    def tags(self) -> dict[str, str]:
        """Model-version tags: provenance, recipe, selection, and every metric (finite ones)."""
        metrics = {**self.validation, **self.test}
        return {
            "study": self.study,
            "trial": str(self.trial),
            "recipe": self.recipe,
            "dataset": self.dataset,
            FINGERPRINT_TAG: self.fingerprint,
            "dataset.options": json.dumps(self.dataset_options, sort_keys=True),
            "preprocessing": json.dumps(
                {k: v for k, v in self.preprocessing.items() if k != "notes"}, sort_keys=True
            ),
            GIT_TAG: self.git_sha,
            "trained_on": self.trained_on,
            "train_resolution": self.training,
            "epochs": str(self.epochs),
            "batch_size": str(self.batch_size),
            "weights": self.weights,
            "evaluation": self.evaluation.describe(),
            "threshold": repr(self.evaluation.threshold),
            "threshold.rule": self.threshold_rule,
            "selection_metric": self.selection_metric,
            DIGEST_TAG: self.selection_digest,
            BASIS_TAG: json.dumps(self.selection_basis, sort_keys=True),
            SEED_TAG: str(self.seed),
            RECIPE_SETTINGS_TAG: json.dumps(self.recipe_settings, sort_keys=True),
            TRAINING_DIGEST_TAG: self.training_digest,
            "folds": str(self.folds),
            "test_scored": "yes" if self.test else "no",
            **{f"param.{k}": str(v) for k, v in self.params.items()},
            **{
                f"{METRIC_TAG}{k}": repr(float(v))
                for k, v in {self.selection_metric: self.selection_value, **metrics}.items()
                if math.isfinite(v)
            },
        }

    def markdown(self, predict_command: str) -> str:
        """The card in words, for the registered version's description."""
        chosen = (
            f"the mean over {self.folds}-fold cross-validation on train + val, each fold "
            f"trained with this exact recipe"
            if self.folds
            else "the val split, with the model trained on train only"
        )
        spread = self.validation.get(self.selection_metric.removesuffix("_mean") + "_std")
        value = f"{self.selection_value:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")
        test = ", ".join(f"{k} {self.test[k]:.4f}" for k in sorted(self.test) if k.count("/") == 1)
        lines = [
            f"MAP-Net for **{self.dataset}** (data fingerprint `{self.fingerprint}`), "
            f"hyperparameters of trial {self.trial} of study `{self.study}`, "
            f"recipe `{self.recipe}`.",
            "",
            f"- Trained on {self.trained_on}: {self.training}, {self.epochs} epochs, "
            f"batch {self.batch_size}, lr {self.params.get('lr', float('nan')):.3g}.",
            f"- Weights: {self.weights}.",
            f"- Scored on test and used with {self.evaluation.describe()}, threshold "
            f"{self.evaluation.threshold:g} ({self.threshold_rule}).",
            f"- Chosen by `{self.selection_metric}` = {value}, from {chosen}; selection "
            f"digest `{self.selection_digest}`.",
            f"- Test: {test} (scored once, after the choice; it decides nothing)."
            if test
            else "- Test: not scored (the dataset has no test split here).",
            "",
            f"Use it: `{predict_command}`",
        ]
        return "\n".join(lines)


def tagged_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The metrics a registered version carries in its tags (see :meth:`ModelCard.tags`)."""
    out = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG):
            try:
                out[key.removeprefix(METRIC_TAG)] = float(value)
            except ValueError:
                continue
    return out
