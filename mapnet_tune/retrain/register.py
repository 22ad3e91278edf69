"""retrain-best, last step: log and register a model, and the champion gate.

The newest registered version becomes the ``challenger``; the ``champion`` alias moves only
to a version with a better validation value (read from the version's tags). A version whose
tags or aliases could not be set is deleted again, so the registry never holds half a model.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
from pathlib import Path

from mapnet_tune import engine
from mapnet_tune.data import raw_example
from mapnet_tune.modelcard import ModelCard, tagged_metrics
from mapnet_tune.names import CHALLENGER, CHAMPION, MODEL_FORMAT_TAG, SERVABLE_FORMAT
from mapnet_tune.predictor import save_folder
from mapnet_tune.recipe import describe_training
from mapnet_tune.retrain.plan import Candidate, Plan, final_train
from mapnet_tune.serving import served_code
from mapnet_tune.tracking import ModelVersionInfo, Tracker, git_sha


def register(
    tracker: Tracker, plan: Plan, cand: Candidate, card: ModelCard
) -> tuple[str, str, str]:
    """Log the servable model, register a version, set the aliases.

    The logged model is linked to the run's metrics at the step that holds the numbers that
    chose it (the CV summary after the last epoch, or the last epoch's validation, counted
    from 0), so its page in MLflow shows them.

    The champion gate reads validation values only. A version whose tags or aliases could
    not be set is deleted again.

    Returns:
        (version, the gate's decision in words, the logged model's id).
    """
    model = engine.clone_model(cand.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_folder(Path(tmp) / "model", model, card)
        uri, model_id = tracker.log_served_model(
            cand.run_id,
            folder,
            served_code(Path(tmp) / "code"),
            raw_example(cand.data),
            {"model_card": card.to_dict()},
            requirements(),
            step=card.epochs if card.folds else card.epochs - 1,
        )
    version = None
    try:
        tags = {**card.tags(), MODEL_FORMAT_TAG: SERVABLE_FORMAT}
        version = tracker.register_version(plan.model_name, uri, model_id, cand.run_id, tags)
        tracker.set_version_description(
            plan.model_name, version, card.markdown(predict_command(plan, version))
        )
        tracker.set_alias(plan.model_name, CHALLENGER, version)
        champion = tracker.version_by_alias(plan.model_name, CHAMPION)
        moves, decision = decide_champion(
            version, card.selection_value, champion, plan.selection, plan.maximize
        )
        if moves:
            tracker.set_alias(plan.model_name, CHAMPION, version)
        tracker.set_model_description(plan.model_name, model_description(plan, version, decision))
    except BaseException:
        if version is not None:
            tracker.delete_version(plan.model_name, version)
        raise
    return version, decision, model_id


def predict_command(plan: Plan, version: str) -> str:
    """The command that uses a version (a number or ``@alias``) on new images."""
    ref = version if version.startswith("@") else f"/{version}"
    return f"mapnet-tune predict --model models:/{plan.model_name}{ref} IMAGES... --out DIR"


def model_description(plan: Plan, newest: str, decision: str) -> str:
    """The registered model's page in words: what it is, how the champion is chosen, use."""
    dataset = plan.config.dataset.name
    return "\n".join(
        [
            f"MAP-Net segmentation models for **{dataset}**, registered by "
            f"`mapnet-tune retrain-best` from study `{plan.study.study_name}`. Each version is "
            f"one retrained trial; its description is its model card: what it was trained on, "
            f"at which resolution, how it was chosen and its single test score.",
            "",
            f"- `@{CHALLENGER}` is the newest version ({newest}); `@{CHAMPION}` moves to a "
            f"version only when its `{plan.selection}` (validation, never test) beats the "
            f"champion's. Last decision: {decision}.",
            f"- Use the champion: `{predict_command(plan, '@' + CHAMPION)}`",
            f"- Score it: `mapnet-tune evaluate --model models:/{plan.model_name}@{CHAMPION} "
            f"--dataset {dataset} --split test`",
        ]
    )


def decide_champion(
    version: str, value: float, champion: ModelVersionInfo | None, metric: str, maximize: bool
) -> tuple[bool, str]:
    """Whether the champion alias moves to a new version, and why, in words.

    The champion's value is read from its ``metric.<name>`` tag. Ties keep the champion.

    Args:
        version: The new version.
        value: Its selection metric (a validation value).
        champion: The current champion, if any.
        metric: The selection metric, e.g. ``cv/val/iou_mean``.
        maximize: Whether larger is better.

    Returns:
        (moves, e.g. "champion moves to version 3 (val/iou 0.8123 > 0.8011 of version 2)").
    """
    moves, stays = f"champion moves to version {version}", "champion stays version"
    if champion is None:
        return True, f"{moves} (the first champion; {metric} {value:.4f})"
    if not math.isfinite(value):
        return False, f"{stays} {champion.version} (version {version} has no finite {metric})"
    held = tagged_metrics(champion.tags).get(metric, math.nan)
    if not math.isfinite(held):
        return True, (
            f"{moves} (version {champion.version} has no {metric} to compare; "
            f"version {version} has {value:.4f})"
        )
    if value > held if maximize else value < held:
        sign = ">" if maximize else "<"
        return True, (
            f"{moves} ({metric} {value:.4f} {sign} {held:.4f} of version {champion.version})"
        )
    sign = ">=" if maximize else "<="
    return False, (
        f"{stays} {champion.version} ({metric} {held:.4f} {sign} {value:.4f} of version {version})"
    )


#: The distributions the served model imports, besides MLflow (which adds itself): the
#: network, the preprocessing (OpenCV, SciPy, Pillow), the dataset options' schemas (pydantic,
#: PyYAML) and the training code the engine package imports (albumentations).
SERVED_DISTRIBUTIONS = (
    "torch",
    "numpy",
    "safetensors",
    "pillow",
    "opencv-python-headless",
    "scipy",
    "pydantic",
    "pyyaml",
    "albumentations",
)


def requirements() -> list[str]:
    """Pins of what the served model needs, at the versions it was registered with.

    Only packages an index serves: mapnet-tune itself travels as code with the model.
    """
    pins = []
    for dist in SERVED_DISTRIBUTIONS:
        version = importlib.metadata.version(dist)
        # A local build tag (torch's "+cpu") is not on the index; the release is.
        pins.append(f"{dist}=={version.split('+')[0]}")
    return pins


def make_card(plan: Plan, cand: Candidate) -> ModelCard:
    """The model card of a candidate about to be registered (its test score comes later)."""
    rt = cand.retraining
    train = rt.training_view(final_train(plan, cand.data))
    return ModelCard(
        dataset=cand.data.name,
        fingerprint=cand.data.fingerprint,
        dataset_options={**plan.config.dataset.options, **rt.recipe.dataset_options},
        preprocessing=cand.data.settings,
        study=plan.study.study_name,
        trial=cand.trial.number,
        recipe=rt.name,
        params=rt.params,
        batch_size=rt.batch_size,
        epochs=rt.recipe.epochs,
        training=describe_training(train),
        trained_on="train+val" if plan.folds else "train",
        weights=rt.weights,
        evaluation=rt.evaluation(train),
        selection_metric=plan.selection,
        selection_value=cand.validation.get(plan.selection, math.nan),
        validation={k: v for k, v in cand.validation.items() if math.isfinite(v)},
        folds=plan.folds,
        git_sha=git_sha(),
    )
