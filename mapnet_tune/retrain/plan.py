"""retrain-best, step one: the request, the candidates and their folds, every check made
before anything is created in MLflow.

The top trials of a study, each with one or more retrain recipes (the study file's
``retrain`` section), are the candidates. With ``folds`` K >= 2 each is cross-validated over
train + val with scikit-learn's ``GroupKFold`` (groups shuffled by the study's seed, so a
patient never sits on both sides of a fold); with 0 each trains on train and is scored on val.
Every candidate validates on the same images, cut the same way: the selection basis that the
champion gate compares. The test split is sealed (:mod:`mapnet_tune.retrain.sealed`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from mapnet_tune.config import DEFAULT_RECIPE, StudyConfig, check_channels, load_study
from mapnet_tune.data import PreparedDataset, Split, fingerprint, prepare
from mapnet_tune.data.splits import concat, take
from mapnet_tune.errors import UserError
from mapnet_tune.metrics import TUNABLE_METRICS, MetricAccumulator
from mapnet_tune.names import model_name
from mapnet_tune.recipe import Retraining, describe_training, suggest, trial_seed
from mapnet_tune.retrain.sealed import SealedSplit
from mapnet_tune.retrain.selection import SelectionBasis, group_folds, protocol_words
from mapnet_tune.storage import load_existing_study, ranked_trials
from mapnet_tune.tracking import Tracker


@dataclass(frozen=True)
class RetrainRequest:
    """What one ``mapnet-tune retrain-best`` needs.

    ``folds`` None takes the study file's ``retrain.folds``; ``recipes`` None takes its
    default recipe only. ``gate``: when the champion was selected on another basis, ``rerun``
    cross-validates its candidate again on the current folds, ``refuse`` keeps the champion.
    """

    study_name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    top_k: int = 3
    folds: int | None = None
    recipes: tuple[str, ...] | None = None
    force: bool = False
    config: Path | None = None
    source: str | None = None
    device: str | None = None
    gate: str = "rerun"


@dataclass
class Candidate:
    """One trial retrained with one recipe, and what validation said about it."""

    trial: optuna.trial.FrozenTrial
    retraining: Retraining
    data: PreparedDataset
    run_id: str = ""
    validation: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = None
    oof: MetricAccumulator | None = None

    @property
    def tag(self) -> str:
        """``t0007``, or ``t0007-crop256`` for a recipe other than the default."""
        name = self.retraining.name
        return f"t{self.trial.number:04d}" + ("" if name == DEFAULT_RECIPE else f"-{name}")


@dataclass
class Plan:
    """Everything checked before the first run is created."""

    study: optuna.Study
    config: StudyConfig
    candidates: list[Candidate]
    skipped: list[str]
    folds: int
    request: RetrainRequest
    basis: SelectionBasis | None = None

    @property
    def model_name(self) -> str:
        """``mapnet-<dataset>``."""
        return model_name(self.config.dataset.name)

    @property
    def selection(self) -> str:
        """The validation metric that decides: ``cv/val/iou_mean``, or ``val/iou``."""
        metric = self.config.objective.metric
        return f"cv/{metric}_mean" if self.folds else metric

    @property
    def maximize(self) -> bool:
        """Whether larger selection values are better."""
        return self.config.objective.direction == "maximize"


def choose_trials(
    req: RetrainRequest, tracker: Tracker
) -> tuple[optuna.Study, StudyConfig, list[optuna.trial.FrozenTrial], list[str]]:
    """The study, its file, and its top trials less those registered already (unless forced).

    Returns:
        (study, config, trials to retrain, one line per skipped trial).
    """
    study = load_existing_study(req.storage, req.study_name)
    trials = ranked_trials(study)
    if not trials:
        counts = {
            s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
            for s in optuna.trial.TrialState
        }
        found = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials at all"
        raise UserError(
            f"study '{study.study_name}' has no completed trial ({found}); run "
            f"`mapnet-tune search --study {study.study_name}` until one completes"
        )
    config = _study_config(study, req.config)
    registered = {
        (v.tags.get("study"), v.tags.get("trial")): v
        for v in tracker.versions(model_name(config.dataset.name))
    }
    chosen, skipped = [], []
    for trial in trials[: req.top_k]:
        known = registered.get((study.study_name, str(trial.number)))
        if known is not None and not req.force:
            skipped.append(
                f"t{trial.number:04d} skipped: already registered as {known.label}; "
                f"pass --force to retrain it again"
            )
        else:
            chosen.append(trial)
    folds = fold_count(req, config)
    if folds and skipped and chosen:
        # With folds the top trials compete as a group and only the winner is registered, so
        # a registered member means this group was decided already.
        skipped.append(
            f"{', '.join(f't{t.number:04d}' for t in chosen)} not cross-validated again: "
            f"a registered trial among the top {req.top_k} means the comparison was made; "
            f"pass --force to repeat it"
        )
        chosen = []
    return study, config, chosen, skipped


def fold_count(req: RetrainRequest, config: StudyConfig) -> int:
    return config.retrain.folds if req.folds is None else req.folds


def make_plan(
    req: RetrainRequest,
    study: optuna.Study,
    config: StudyConfig,
    trials: list[optuna.trial.FrozenTrial],
    skipped: list[str],
) -> Plan:
    """Prepare each recipe's data and check every candidate against it; create nothing.

    Raises:
        UserError: An unknown recipe, data that cannot be prepared, bad ``--folds``, a crop
            recipe on whole images, or a batch larger than the training samples.
    """
    names = req.recipes or (DEFAULT_RECIPE,)
    unknown = [n for n in names if n not in config.retrain.recipes]
    if unknown:
        raise UserError(
            f"--recipe {unknown[0]} is not a recipe of {config.path}; its recipes: "
            f"{', '.join(config.retrain.recipes)} (add variants under retrain.variants)"
        )
    metric = config.objective.metric.split("/", 1)[1]
    if config.retrain.threshold == "tune" and metric not in TUNABLE_METRICS:
        raise UserError(
            f"retrain.threshold: tune in {config.path} needs an objective that depends on the "
            f"threshold ({', '.join(TUNABLE_METRICS)}), not {config.objective.metric}; "
            f"set a number such as 0.5"
        )
    plan = Plan(study, config, [], skipped, fold_count(req, config), req)
    for name in dict.fromkeys(names):
        recipe = config.retrain.recipes[name]
        options = {**config.dataset.options, **recipe.dataset_options}
        where = "retrain" if name == DEFAULT_RECIPE else f"retrain.variants.{name}"
        try:
            data = prepare(config.dataset.name, req.source or config.dataset.source, options)
        except UserError as exc:
            raise UserError(
                f"{exc} (retraining data of {config.path}: dataset.options with "
                f"{where}.dataset_options over them)"
            ) from None
        check_channels(config, data.channels)
        data = sealed(data)
        for trial in trials:
            params = suggest(optuna.trial.FixedTrial(trial.params), config)
            retraining = Retraining(
                config, name, recipe, params, trial_seed(config.sampler.seed, trial.number)
            )
            plan.candidates.append(Candidate(trial, retraining, data))
    plan.basis = _basis(plan)
    for cand in plan.candidates:
        check_candidate(plan, cand)
    return plan


def sealed(data: PreparedDataset) -> PreparedDataset:
    """The same data with its test split (if any) sealed until registration returns."""
    if "test" not in data.splits:
        return data
    return replace(data, splits={**data.splits, "test": SealedSplit(data.splits["test"])})


def _basis(plan: Plan) -> SelectionBasis:
    """The selection basis every candidate shares.

    Raises:
        UserError: Recipes whose dataset options change which images validate, or more folds
            than groups.
    """
    config, first = plan.config, plan.candidates[0]
    merged = train_and_val(first.data)
    for cand in plan.candidates[1:]:
        other = cand.data.splits
        if (other["train"].names, other["val"].names) != (
            first.data.splits["train"].names,
            first.data.splits["val"].names,
        ):
            raise UserError(
                f"recipes '{first.retraining.name}' and '{cand.retraining.name}' of "
                f"{config.path} validate on different images (their dataset_options change the "
                f"split), so they cannot compete; pass them to --recipe in separate commands"
            )
    if plan.folds:
        groups = len(set(merged.image_groups))
        if not 2 <= plan.folds <= groups:
            raise UserError(
                f"--folds {plan.folds} needs between 2 and {groups} folds: train + val has "
                f"{groups} groups in {len(merged.names)} images (--folds 0 decides on the val "
                f"split)"
            )
        cut = group_folds(merged, plan.folds, config.sampler.seed)
        folds = tuple(tuple(sorted(merged.names[i] for i in held)) for _, held in cut)
    else:
        folds = (tuple(sorted(first.data.splits["val"].names)),)
    options = dict(config.dataset.options)
    source = plan.request.source or config.dataset.source
    return SelectionBasis(
        dataset=config.dataset.name,
        fingerprint=fingerprint(config.dataset.name, source, options),
        options=options,
        pool=tuple(sorted(merged.names)),
        folds=folds,
        seed=config.sampler.seed if plan.folds else None,
        metric=plan.selection,
        protocol=protocol_words(plan.folds),
    )


def check_candidate(plan: Plan, cand: Candidate) -> None:
    """The candidate's recipe fits its data: crops exist, folds fit, batches fit."""
    data, rt = cand.data, cand.retraining
    try:
        final = rt.training_view(final_train(plan, data))
    except ValueError as exc:
        raise UserError(f"{exc} ({plan.config.path})") from None
    trainings = [final]
    if plan.folds:
        merged = train_and_val(data)
        trainings += [rt.training_view(take(merged, rest)) for rest, _ in kfold(plan, merged)]
    fewest = min(_samples(split) for split in trainings)
    if rt.batch_size > fewest:
        raise UserError(
            f"trial {cand.trial.number}'s batch size {rt.params['batch_size']} x "
            f"batch_scale {rt.recipe.batch_scale:g} of recipe '{rt.name}' = {rt.batch_size} is "
            f"more than the {fewest} training samples available; lower the batch_scale in "
            f"{plan.config.path} or use fewer --folds"
        )


def train_and_val(data: PreparedDataset) -> Split:
    """Train + val: what cross-validation folds, and what a model with folds trains on."""
    return concat([data.splits["train"], data.splits["val"]])


def final_train(plan: Plan, data: PreparedDataset) -> Split:
    """Train + val after cross-validation; train alone when val decides."""
    return train_and_val(data) if plan.folds else data.splits["train"]


def kfold(plan: Plan, merged: Split) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training images, held-out images) per fold of the plan's basis, by image name: the
    same images for every candidate and for a champion re-run on this pool."""
    position = {name: index for index, name in enumerate(merged.names)}
    everything = np.arange(len(merged.names))
    out = []
    for names in plan.basis.folds:
        held = np.array(sorted(position[name] for name in names), dtype=np.int64)
        out.append((np.setdiff1d(everything, held), held))
    return out


def _samples(split: Split) -> int:
    return len(split.patches) if split.patches is not None else len(split.images)


def _study_config(study: optuna.Study, path: Path | None) -> StudyConfig:
    """The study file the search ran with (or ``path``), which must match the study."""
    recorded = study.user_attrs.get("config_file")
    if path is None and recorded is None:
        raise UserError(
            f"study '{study.study_name}' does not record its study file; pass --config FILE"
        )
    path = path or Path(recorded)
    if not path.is_file():
        raise UserError(
            f"the study file {path} of study '{study.study_name}' is not found from "
            f"here; pass --config FILE"
        )
    config = load_study(path)
    if study.user_attrs.get("config_digest") not in (None, config.digest()):
        raise UserError(
            f"{path} differs from the settings study '{study.study_name}' was "
            f"searched with (dataset, model, training, objective or search space; "
            f"only the retrain section may change); pass --config with that file"
        )
    return config


def selection_note(plan: Plan) -> str:
    how = (
        f"the {plan.folds}-fold cross-validated mean over train + val, each fold trained "
        f"with the recipe of the registered model"
        if plan.folds
        else "the val split, with models trained on train only"
    )
    has_test = all("test" in c.data.splits for c in plan.candidates)
    test = (
        "test is scored once per registered model, after every decision"
        if has_test
        else "the dataset has no test split here, so no test numbers are reported"
    )
    return f"note: candidates and the champion are decided on {plan.selection} from {how}; {test}"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def recipe_params(plan: Plan, cand: Candidate, device: torch.device) -> dict[str, Any]:
    """What a candidate's run logs as parameters besides the trial's: the recipe in full."""
    rt, train = cand.retraining, cand.data.splits["train"]
    recipe = rt.recipe
    return {
        "recipe": rt.name,
        "recipe.epochs": recipe.epochs,
        "recipe.resolution": recipe.resolution,
        "recipe.batch_scale": recipe.batch_scale,
        "recipe.val_every": recipe.val_every,
        "recipe.evaluation": rt.evaluation(rt.training_view(train)).describe(),
        "recipe.training": describe_training(rt.training_view(train)),
        "folds": plan.folds,
        "selection": plan.selection,
        "seed": rt.seed,
        "batch_size": rt.batch_size,
        "device": str(device),
        **{f"dataset.{k}": v for k, v in sorted(cand.data.settings.items()) if k != "notes"},
    }
