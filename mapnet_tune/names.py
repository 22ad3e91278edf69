"""The names that tie Optuna, MLflow and the registry together, spelled in one place.

Trial and run point at each other (trial user attribute ``mlflow_run_id``; run tags
``optuna.study``, ``optuna.trial``), runs carry their role, and registered models, aliases and
artifacts have fixed names that predict, evaluate and report look up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Run tags.
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial"
STORAGE_TAG = "optuna.storage"
ROLE_TAG = "mapnet_tune.role"
RECIPE_TAG = "mapnet_tune.recipe"
FOLD_TAG = "mapnet_tune.fold"
SEARCH_RUN_TAG = "mapnet_tune.search_run"
OVERLAY_EPOCH_TAG = "mapnet_tune.overlay_epoch"
GIT_TAG = "git.sha"
FINGERPRINT_TAG = "dataset.fingerprint"
#: Experiment tags: the study's best trial's run so far (the UI links to it), and the dataset
#: it searches (whose registered model the UI links to).
BEST_RUN_TAG = "mapnet_tune.best_run"
DATASET_TAG = "mapnet_tune.dataset"
#: What MLflow's Source column shows for the runs each command makes.
SEARCH_SOURCE = "mapnet-tune search"
RETRAIN_SOURCE = "mapnet-tune retrain-best"
REPORT_SOURCE = "mapnet-tune report"
#: Trial user attribute holding its MLflow run id; study user attribute holding the parent's.
RUN_ID_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"

#: Aliases of the registered model: the newest version, and the one the gate chose.
CHAMPION, CHALLENGER = "champion", "challenger"
#: Where a version registered before servable models keeps its checkpoint, and where a
#: registered version's run keeps its held-out ROC points.
CHECKPOINT_ARTIFACT = "checkpoint/mapnet.pt"
ROC_ARTIFACT = "evaluation/roc.json"
#: Where a trial's run keeps the overlays of its best epoch.
OVERLAY_ARTIFACT = "overlays/best_epoch.png"
#: Version tag of a servable registered model (an MLflow pyfunc over a model folder), and its
#: value; versions without it were registered before and carry only a checkpoint.
MODEL_FORMAT_TAG = "mapnet_tune.model_format"
SERVABLE_FORMAT = "pyfunc-1"
#: Tag prefix of the metrics on a registered version: ``metric.cv/val/iou_mean``.
METRIC_TAG = "metric."
#: The study parent run's metrics, one step per finished trial: the best objective so far,
#: and how many trials ended in each state.
STUDY_BEST_METRIC = "best"
TRIAL_COUNT_METRICS = {
    "complete": "trials/complete",
    "pruned": "trials/pruned",
    "failed": "trials/failed",
}


def summary_key(metric: str, which: str) -> str:
    """A trial's one-point summary of a per-epoch metric: ``val/iou`` -> ``val_best/iou``.

    MLflow's run page lists metric sections by name, so ``val_best`` and ``val_final`` come
    after the per-epoch curves (``time``, ``train``, ``val``) instead of before them.
    """
    split, _, name = metric.partition("/")
    return f"{split}_{which}/{name}"


def model_name(dataset: str) -> str:
    """The registered model of a dataset: ``mapnet-drive``."""
    return f"mapnet-{dataset}"


def trial_tag(number: int) -> str:
    """``t0007``: how trials are named in run names, tables and messages."""
    return f"t{number:04d}"


def params_for_log(params: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled parameters with the ``hp.`` prefix used in MLflow."""
    return {f"hp.{k}": v for k, v in params.items()}
