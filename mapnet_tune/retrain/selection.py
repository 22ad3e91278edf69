"""What makes two validation numbers comparable, and how the champion gate compares them.

A *selection basis* is everything a validation number depends on besides the model: the data
(fingerprint and options), the pool of images that validate (train + val), how they are cut
(the folds, by group, or the val split), the seed of that cut, the metric and the protocol.
Its digest goes on every registered version; the gate compares numbers only under one digest.

With folds the gate compares per-fold values, paired on the same folds: the challenger wins
only when the mean paired difference is larger than its standard error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold

from mapnet_tune.config import StudyConfig
from mapnet_tune.data import Split
from mapnet_tune.metrics import MetricAccumulator

#: Version of how selection numbers are computed; a change makes old numbers incomparable.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class SelectionBasis:
    """What a selection number was measured on.

    Attributes:
        dataset: Dataset name.
        fingerprint: Fingerprint of the data as the study file's ``dataset.options`` prepare it.
        options: Those options.
        pool: Sorted names of the images that validate (train + val).
        folds: Sorted held-out names per fold; with ``--folds 0`` one entry, the val names.
        seed: Seed of the group shuffle (None with the val split).
        metric: The selection metric (``cv/val/iou_mean`` or ``val/iou``).
        protocol: How the number is computed, in words.
    """

    dataset: str
    fingerprint: str
    options: dict[str, Any]
    pool: tuple[str, ...]
    folds: tuple[tuple[str, ...], ...]
    seed: int | None
    metric: str
    protocol: str

    def parts(self) -> dict[str, str]:
        """A short hash of each part, so that a mismatch can say which parts differ."""
        return {key: _hash(value) for key, value in asdict(self).items()}

    def digest(self) -> str:
        """16 hex characters over every part."""
        return _hash(self.parts())

    def differences(self, parts: dict[str, str]) -> list[str]:
        """The parts that differ from another basis' :meth:`parts` (all, when it has none)."""
        return [key for key, value in self.parts().items() if parts.get(key) != value]


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_digest(config: StudyConfig) -> str:
    """A digest of what a retraining depends on besides its recipe and parameters: the study
    file's model, train and objective sections (not its sampler, pruner or search space)."""
    return _hash(config.model_dump(mode="json", include={"model", "train", "objective"}))


def protocol_words(folds: int) -> str:
    """The selection protocol in words (part of the basis)."""
    if folds:
        return (
            f"v{PROTOCOL_VERSION}: {folds}-fold cross-validation over train + val with whole "
            "groups held out, metrics pooled over each held-out fold's pixels at threshold 0.5, "
            "mean over folds"
        )
    return f"v{PROTOCOL_VERSION}: val split, metrics pooled over its pixels at threshold 0.5"


def group_folds(merged: Split, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training images, held-out images) per fold; a group never sits on both sides.

    scikit-learn's ``GroupKFold`` with the groups shuffled by ``seed``: the same for every
    candidate, and, by image names, for any re-run on the same pool.
    """
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    groups = np.asarray(merged.image_groups, dtype=object)
    return list(splitter.split(np.arange(len(groups)), groups=groups))


@dataclass(frozen=True)
class Standing:
    """A model's selection numbers on one basis.

    Attributes:
        version: The registered version (or ``"new"``).
        value: The selection value (a CV mean or a val number).
        folds: Per-fold values in the basis' fold order; empty with the val split.
    """

    version: str
    value: float
    folds: tuple[float, ...] = ()

    @classmethod
    def read(cls, version: str, metrics: Mapping[str, float], metric: str, folds: int) -> Standing:
        """The numbers of ``metric`` and its ``folds`` per-fold values among ``metrics``."""
        values = [metrics.get(fold_key(metric, i + 1)) for i in range(folds)]
        return cls(version, metrics.get(metric, math.nan), () if None in values else tuple(values))


def fold_key(metric: str, index: int) -> str:
    """``cv/val/iou_fold2``: fold ``index`` (from 1) of the selection metric ``cv/val/iou_mean``."""
    return f"{metric.removesuffix('_mean')}_fold{index}"


def paired_margin(new: Standing, held: Standing, maximize: bool) -> tuple[float, float]:
    """Mean of the paired per-fold differences (positive: ``new`` is better) and its SE."""
    sign = 1.0 if maximize else -1.0
    diffs = sign * (np.asarray(new.folds) - np.asarray(held.folds))
    se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.inf
    return float(np.mean(diffs)), se


def choose_threshold(
    config: StudyConfig, folds: int, oof: MetricAccumulator | None
) -> tuple[float, str]:
    """The registered model's threshold, and how it was chosen, in words.

    ``retrain.threshold`` as a number is kept; ``tune`` takes the threshold that maximises
    the objective on ``oof``: the chosen candidate's pooled out-of-fold probabilities (its
    val-split probabilities with ``folds`` 0). Validation data only.
    """
    fixed = config.retrain.threshold
    if fixed != "tune":
        return fixed, f"fixed at {fixed:g}" + (", as in the published rows" * (fixed == 0.5))
    metric = config.objective.metric
    threshold, value = oof.best_threshold(metric.split("/", 1)[1])
    at_half = oof.compute("val")[metric]
    where = f"the out-of-fold probabilities of its {folds} folds" if folds else "the val split"
    return threshold, (
        f"tuned on {where} to maximise {metric}: {value:.4f} there, {at_half:.4f} at 0.5"
    )
