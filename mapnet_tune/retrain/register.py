"""retrain-best, last step: log and register a model, and the champion gate.

The newest registered version becomes the ``challenger``. The ``champion`` alias moves only
to a version that beats the champion on the same selection basis (see
:mod:`mapnet_tune.retrain.selection`): with folds by more than the standard error of the paired
per-fold differences, with the val split by a better value. A champion selected on another
basis is compared through its re-run candidate, or not at all (:mod:`.rival`). A version whose
tags or aliases could not be set is deleted again, so the registry never holds half a model.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
from pathlib import Path

from mapnet_tune import engine
from mapnet_tune.data import raw_example
from mapnet_tune.modelcard import DIGEST_TAG, ModelCard, tagged_metrics
from mapnet_tune.names import CHALLENGER, CHAMPION, MODEL_FORMAT_TAG, SERVABLE_FORMAT
from mapnet_tune.predictor import save_folder
from mapnet_tune.recipe import describe_training
from mapnet_tune.retrain.plan import Candidate, Plan, final_train
from mapnet_tune.retrain.rival import Rival
from mapnet_tune.retrain.selection import Standing, paired_margin, training_digest
from mapnet_tune.serving import served_code
from mapnet_tune.tracking import ModelVersionInfo, Tracker, git_sha


def register(
    tracker: Tracker, plan: Plan, cand: Candidate, card: ModelCard, rival: Rival | None = None
) -> tuple[str, str, str]:
    """Log the servable model, register a version, set the aliases.

    The logged model is linked to the run's metrics at the step that holds the numbers that
    chose it (the CV summary after the last epoch, or the last epoch's validation, counted
    from 0), so its page in MLflow shows them. The champion gate reads validation values only
    (``rival``: the champion re-run on the current folds, or why it was not). A version whose
    tags or aliases could not be set is deleted again.

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
        moves, decision = gate(plan, standing(version, card), champion, rival)
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
            f"champion's on the same selection digest (with folds, by more than the standard "
            f"error of the paired per-fold differences); a champion selected on another "
            f"digest is re-run on the current folds first. Last decision: {decision}.",
            f"- Use the champion: `{predict_command(plan, '@' + CHAMPION)}`",
            f"- Score it: `mapnet-tune evaluate --model models:/{plan.model_name}@{CHAMPION} "
            f"--dataset {dataset} --split test`",
        ]
    )


def standing(version: str, card: ModelCard) -> Standing:
    """A new version's selection value and per-fold values, from its card."""
    metrics = {**card.validation, card.selection_metric: card.selection_value}
    return Standing.read(version, metrics, card.selection_metric, card.folds)


def gate(
    plan: Plan, new: Standing, champion: ModelVersionInfo | None, rival: Rival | None
) -> tuple[bool, str]:
    """Whether the champion alias moves to ``new``, and why: like is compared with like."""
    if champion is None or champion.tags.get(DIGEST_TAG) == plan.basis.digest():
        held = None
        if champion is not None:
            tagged = tagged_metrics(champion.tags)
            held = Standing.read(champion.version, tagged, plan.selection, plan.folds)
        return decide_champion(new, held, plan.selection, plan.maximize)
    if rival is not None and rival.version == champion.version and rival.standing is not None:
        moves, why = decide_champion(new, rival.standing, plan.selection, plan.maximize)
        return moves, f"{rival.mismatch()}: {rival.compared()}; {why}"
    mismatch = rival.mismatch() if rival is not None else "the selection digest differs"
    refused = rival.refused if rival is not None else "its candidate was not re-run"
    return False, (
        f"champion stays version {champion.version}, not compared: {mismatch} and {refused}"
    )


def decide_champion(
    new: Standing, held: Standing | None, metric: str, maximize: bool
) -> tuple[bool, str]:
    """Whether the champion alias moves to a new version, and why, in words.

    With per-fold values on both sides (the same folds), the new version wins only when the
    mean paired difference exceeds its standard error; otherwise a tie within CV noise keeps
    the champion. Without folds (the val split) the better value wins; ties keep the champion.

    Args:
        new: The new version's numbers.
        held: The champion's numbers on the same basis, if there is a champion.
        metric: The selection metric, e.g. ``cv/val/iou_mean``.
        maximize: Whether larger is better.

    Returns:
        (moves, e.g. "champion moves to version 3 (val/iou 0.8123 > 0.8011 of version 2)").
    """
    moves, stays = f"champion moves to version {new.version}", "champion stays version"
    if held is None:
        return True, f"{moves} (the first champion; {metric} {new.value:.4f})"
    if not math.isfinite(new.value):
        return False, f"{stays} {held.version} (version {new.version} has no finite {metric})"
    if not math.isfinite(held.value):
        return False, (
            f"{stays} {held.version} (it has no {metric} to compare with on this selection "
            f"basis; set the champion alias by hand if version {new.version} should take it)"
        )
    if len(new.folds) > 1 and len(new.folds) == len(held.folds):
        diff, se = paired_margin(new, held, maximize)
        per_fold = metric.removeprefix("cv/").removesuffix("_mean")
        numbers = (
            f"paired {per_fold} difference {diff:+.4f}, standard error {se:.4f} over "
            f"{len(new.folds)} folds; means {new.value:.4f} and {held.value:.4f} of version "
            f"{held.version}"
        )
        if diff > se:
            return True, f"{moves} ({numbers})"
        if diff >= -se:
            return False, f"tie within CV noise: champion stays version {held.version} ({numbers})"
        return False, f"{stays} {held.version} (version {new.version} is worse: {numbers})"
    better = new.value > held.value if maximize else new.value < held.value
    rule = "by the val-split rule: no folds to measure noise, the better value wins"
    if better:
        sign = ">" if maximize else "<"
        return True, (
            f"{moves} ({metric} {new.value:.4f} {sign} {held.value:.4f} of version "
            f"{held.version}) {rule}"
        )
    sign = ">=" if maximize else "<="
    return False, (
        f"{stays} {held.version} ({metric} {held.value:.4f} {sign} {new.value:.4f} of version "
        f"{new.version}) {rule}"
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


def make_card(plan: Plan, cand: Candidate, threshold: float, rule: str) -> ModelCard:
    """The model card of a candidate about to be registered (its test score comes later).

    Args:
        threshold: Its probability threshold; ``rule`` says how it was chosen.
    """
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
        evaluation=rt.served_evaluation(train, threshold),
        selection_metric=plan.selection,
        selection_value=cand.validation.get(plan.selection, math.nan),
        validation={k: v for k, v in cand.validation.items() if math.isfinite(v)},
        folds=plan.folds,
        git_sha=git_sha(),
        seed=rt.seed,
        recipe_settings=rt.recipe.model_dump(mode="json"),
        training_digest=training_digest(plan.config),
        selection_digest=plan.basis.digest(),
        selection_basis=plan.basis.parts(),
        threshold_rule=rule,
    )
