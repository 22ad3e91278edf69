"""retrain-best: from a finished study to a registered model whose numbers can be trusted.

The top trials of a study, each with one or more retrain recipes (the study file's
``retrain`` section), are the candidates. Every decision uses validation only:

- With ``folds`` K >= 2 (a study file's ``retrain.folds``, or ``--folds``), each candidate is
  cross-validated over train + val with scikit-learn's seeded, shuffled ``KFold``; every fold
  trains with exactly the recipe of the registered model, so the mean estimates that model.
  The best mean is retrained on all of train + val and registered.
- With ``--folds 0``, each candidate trains on train and is scored on val; each is registered.

The registered version then becomes the ``challenger``; the ``champion`` alias moves only to a
version with a better validation value. Test is scored once per registered version, after all
of that, and stored with it for the report: it never enters a decision.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from sklearn.model_selection import KFold

from mapnet_tune import checkpoint, engine
from mapnet_tune.config import DEFAULT_RECIPE, StudyConfig, check_channels, load_study
from mapnet_tune.data import PreparedDataset, Split, prepare
from mapnet_tune.data.splits import concat, take
from mapnet_tune.errors import UserError
from mapnet_tune.metrics import MetricAccumulator
from mapnet_tune.modelcard import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_ARTIFACT,
    ROC_ARTIFACT,
    ModelCard,
    model_name,
    tagged_metrics,
)
from mapnet_tune.recipe import Retraining, build_model, describe_training, suggest, trial_seed
from mapnet_tune.search import load_existing_study, params_for_log, ranked_trials
from mapnet_tune.tracking import ModelVersionInfo, Tracker, git_sha

EXAMPLE_SIDE = 64


@dataclass(frozen=True)
class RetrainRequest:
    """What one ``mapnet-tune retrain-best`` needs.

    ``folds`` None takes the study file's ``retrain.folds``; ``recipes`` None takes its
    default recipe only.
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


@dataclass
class Candidate:
    """One trial retrained with one recipe, and what validation said about it."""

    trial: optuna.trial.FrozenTrial
    retraining: Retraining
    data: PreparedDataset
    run_id: str = ""
    validation: dict[str, float] = field(default_factory=dict)
    model: torch.nn.Module | None = None

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


def retrain_best(req: RetrainRequest) -> str:
    """Validate the top trials' recipes, register the chosen models, score them on test once.

    Args:
        req: The study, how many trials, the folds and recipes, and whether to retrain trials
            that are registered already.

    Returns:
        The summary for the user: notes, skipped trials, the decisions and a table.

    Raises:
        UserError: An unknown or empty study, a study without completed trials, a study file
            that does not match the study, an unknown recipe, or data that cannot be prepared.
            Nothing is created in MLflow in those cases.
    """
    tracker = Tracker(req.tracking_uri)
    tracker.check_reachable()
    study, config, chosen, skipped = _choose_trials(req, tracker)
    if not chosen:
        return "\n".join([*skipped, "nothing to retrain"])
    plan = make_plan(req, study, config, chosen, skipped)
    lines = [*plan.skipped, _selection_note(plan)]
    for line in lines:
        _say(line)
    lines += Runner(plan, tracker).run()
    return "\n".join(lines)


def _choose_trials(
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
    folds = _fold_count(req, config)
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


def _fold_count(req: RetrainRequest, config: StudyConfig) -> int:
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
    plan = Plan(study, config, [], skipped, _fold_count(req, config), req)
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
        for trial in trials:
            params = suggest(optuna.trial.FixedTrial(trial.params), config)
            retraining = Retraining(
                config, name, recipe, params, trial_seed(config.sampler.seed, trial.number)
            )
            plan.candidates.append(Candidate(trial, retraining, data))
    for cand in plan.candidates:
        _check(plan, cand)
    return plan


def _check(plan: Plan, cand: Candidate) -> None:
    """The candidate's recipe fits its data: crops exist, folds fit, batches fit."""
    data, rt = cand.data, cand.retraining
    try:
        final = rt.training_view(_final_train(plan, data))
    except ValueError as exc:
        raise UserError(f"{exc} ({plan.config.path})") from None
    trainings = [final]
    if plan.folds:
        merged = _merged(data)
        count = len(merged.images)
        if not 2 <= plan.folds <= count:
            raise UserError(
                f"--folds {plan.folds} needs between 2 and {count} folds: train + val has "
                f"{count} images (--folds 0 decides on the val split)"
            )
        trainings += [rt.training_view(take(merged, rest)) for rest, _ in _kfold(plan, merged)]
    fewest = min(_samples(split) for split in trainings)
    if rt.batch_size > fewest:
        raise UserError(
            f"trial {cand.trial.number}'s batch size {rt.params['batch_size']} x "
            f"batch_scale {rt.recipe.batch_scale:g} of recipe '{rt.name}' = {rt.batch_size} is "
            f"more than the {fewest} training samples available; lower the batch_scale in "
            f"{plan.config.path} or use fewer --folds"
        )


def _merged(data: PreparedDataset) -> Split:
    """Train + val: what cross-validation folds, and what a model with folds trains on."""
    return concat([data.splits["train"], data.splits["val"]])


def _final_train(plan: Plan, data: PreparedDataset) -> Split:
    """Train + val after cross-validation; train alone when val decides."""
    return _merged(data) if plan.folds else data.splits["train"]


def _kfold(plan: Plan, merged: Split) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training images, held-out images) per fold: seeded, shuffled, the same for everyone."""
    kfold = KFold(n_splits=plan.folds, shuffle=True, random_state=plan.config.sampler.seed)
    return list(kfold.split(np.arange(len(merged.images))))


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


def _selection_note(plan: Plan) -> str:
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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Runner:
    """Creates the runs, validates, trains, registers and scores; every run ends truthfully."""

    def __init__(self, plan: Plan, tracker: Tracker) -> None:
        self.plan, self.tracker = plan, tracker
        self.device = engine.pick_device(plan.request.device)
        self.experiment_id = ""
        self.parent = ""
        self.running: list[str] = []

    def run(self) -> list[str]:
        """Validate every candidate, register the chosen ones, score them on test.

        Returns:
            Summary lines: the validation table, champion decisions, the registered versions.
        """
        plan = self.plan
        self.experiment_id = self.tracker.experiment(plan.study.study_name)
        self.parent = self._start(f"{plan.config.dataset.name}-retrain", self._tags("retrain"))
        self.tracker.log_params(
            self.parent,
            {
                "top_k": plan.request.top_k,
                "force": plan.request.force,
                "folds": plan.folds,
                "selection": plan.selection,
                "candidates": ",".join(c.tag for c in plan.candidates),
            },
        )
        try:
            lines = self._run_candidates()
        except BaseException as exc:
            # Every run still open (innermost first) ends with what stopped it.
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            for run_id in reversed(self.running):
                self.tracker.end_run(run_id, status, f"{type(exc).__name__}: {exc}")
            raise
        self._finish(self.parent)
        return lines

    def _start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        run_id = self.tracker.create_run(self.experiment_id, name, tags, parent_run_id=parent)
        self.running.append(run_id)
        return run_id

    def _finish(self, run_id: str, reason: str | None = None) -> None:
        self.running.remove(run_id)
        self.tracker.end_run(run_id, "FINISHED", reason)

    def _tags(self, role: str, cand: Candidate | None = None) -> dict[str, str]:
        tags = {
            "optuna.study": self.plan.study.study_name,
            "mapnet_tune.role": role,
            "git.sha": git_sha(),
        }
        if cand is not None:
            tags.update(
                {
                    "optuna.trial": str(cand.trial.number),
                    "mapnet_tune.recipe": cand.retraining.name,
                    "dataset.fingerprint": cand.data.fingerprint,
                }
            )
        return tags

    def _recipe_params(self, cand: Candidate) -> dict[str, Any]:
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
            "folds": self.plan.folds,
            "selection": self.plan.selection,
            "seed": rt.seed,
            "batch_size": rt.batch_size,
            "device": str(self.device),
            **{f"dataset.{k}": v for k, v in sorted(cand.data.settings.items()) if k != "notes"},
        }

    def _run_candidates(self) -> list[str]:
        plan = self.plan
        for cand in plan.candidates:
            cand.run_id = self._start(
                f"{plan.config.dataset.name}-retrain-{cand.tag}",
                {
                    **self._tags("retrain-trial", cand),
                    "mapnet_tune.search_run": cand.trial.user_attrs.get("mlflow_run_id", ""),
                },
                self.parent,
            )
            self.tracker.log_params(
                cand.run_id, {**params_for_log(cand.retraining.params), **self._recipe_params(cand)}
            )
        for cand in plan.candidates:
            if plan.folds:
                self._cross_validate(cand)
            else:
                self._validate_on_val(cand)
        lines = [self._validation_table()]
        chosen = plan.candidates
        if plan.folds:
            chosen = [_best(plan.candidates, plan.selection, plan.maximize)]
            lines.append(f"chosen by {plan.selection}: {chosen[0].tag}")
            for cand in plan.candidates:
                if cand is not chosen[0]:
                    self._finish(
                        cand.run_id,
                        f"not registered: {chosen[0].tag} has the best {plan.selection}",
                    )
        rows = []
        for cand in chosen:
            version, decision, card = self._final(cand)
            self._finish(cand.run_id)
            lines.append(
                f"{cand.tag} registered as {plan.model_name} version {version}: {decision}"
            )
            rows.append((cand, version, card))
        return [*lines, "", self._table(rows)]

    def _train(
        self, cand: Candidate, train: Split, val: Split | None, run_id: str, label: str
    ) -> tuple[torch.nn.Module, dict[str, float]]:
        """A fresh model trained with the candidate's recipe, holding the final weights.

        With ``val``, the held-out images are scored every ``val_every`` epochs and after
        the last, and logged as the run's validation curve.

        Returns:
            (the model, the ``val/*`` metrics of its final weights; empty without ``val``).
        """
        rt = cand.retraining
        train = rt.training_view(train)
        settings = rt.settings(train)
        torch.manual_seed(rt.seed)
        model = build_model(self.plan.config, cand.data.channels)

        def on_epoch(epoch: int, metrics: dict[str, float], _: torch.nn.Module, __: bool) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            key = self.plan.config.objective.metric
            shown = f" {key} {metrics[key]:.4f}" if key in metrics else ""
            loss = metrics["train/loss"]
            _say(f"{label} epoch {epoch + 1}/{settings.epochs} loss {loss:.4f}{shown}")

        result = engine.fit(
            model,
            train,
            val,
            settings,
            augment=rt.augmentation(cand.data.channels, self.device),
            on_epoch=on_epoch,
            device=self.device,
        )
        # The last epoch is always validated: its numbers are those of the weights kept.
        final = result.history[-1] if result.history else {}
        return model, {k: v for k, v in final.items() if k.startswith("val/")}

    def _cross_validate(self, cand: Candidate) -> None:
        """Train on all folds but one with the recipe, score the one left out; log each."""
        plan = self.plan
        merged = _merged(cand.data)
        scores: list[dict[str, float]] = []
        folds = _kfold(plan, merged)
        for index, (rest, held) in enumerate(folds):
            run_id = self._start(
                f"{plan.config.dataset.name}-retrain-{cand.tag}-fold{index + 1}",
                {**self._tags("retrain-fold", cand), "mapnet_tune.fold": str(index + 1)},
                cand.run_id,
            )
            self.tracker.log_params(run_id, {"held_out": ",".join(merged.names[i] for i in held)})
            held_out = take(merged, held)
            _, metrics = self._train(
                cand,
                take(merged, rest),
                held_out,
                run_id,
                f"{cand.tag} fold {index + 1}/{len(folds)}",
            )
            self._finish(run_id)
            scores.append(metrics)
        for key in scores[0]:
            values = np.array([s[key] for s in scores], dtype=float)
            cand.validation[f"cv/{key}_mean"] = float(np.mean(values))
            cand.validation[f"cv/{key}_std"] = float(np.std(values))
        self.tracker.log_metrics(cand.run_id, cand.validation, step=cand.retraining.recipe.epochs)
        key = plan.config.objective.metric
        _say(
            f"{cand.tag} {len(scores)}-fold {key} {cand.validation[f'cv/{key}_mean']:.4f} "
            f"+- {cand.validation[f'cv/{key}_std']:.4f}"
        )

    def _validate_on_val(self, cand: Candidate) -> None:
        """Train on train with the recipe and score val: the model that may be registered."""
        val = cand.data.splits["val"]
        cand.model, cand.validation = self._train(
            cand, cand.data.splits["train"], val, cand.run_id, cand.tag
        )
        _say(f"{cand.tag} {self.plan.selection} {cand.validation[self.plan.selection]:.4f}")

    def _score(
        self,
        cand: Candidate,
        model: torch.nn.Module,
        split: Split,
        prefix: str,
        accumulator: MetricAccumulator | None = None,
    ) -> dict[str, float]:
        """The recipe's evaluation of ``split``, with the published legacy columns."""
        rt = cand.retraining
        evaluation = rt.evaluation(rt.training_view(cand.data.splits["train"]))
        return engine.evaluate(
            model,
            split,
            evaluation,
            prefix,
            device=self.device,
            legacy=True,
            accumulator=accumulator,
        )

    def _validation_table(self) -> str:
        plan = self.plan
        std = plan.selection.removesuffix("_mean") + "_std"
        rows = []
        for c in plan.candidates:
            value = c.validation.get(plan.selection, math.nan)
            spread = f" +- {c.validation[std]:.4f}" if std in c.validation else ""
            rows.append(f"{c.tag}: {plan.selection} {value:.4f}{spread}")
        return "\n".join(rows)

    def _final(self, cand: Candidate) -> tuple[str, str, ModelCard]:
        """The registered model: trained (after CV), registered, gated, then scored on test."""
        plan = self.plan
        if cand.model is None:
            cand.model, _ = self._train(
                cand, _final_train(plan, cand.data), None, cand.run_id, f"{cand.tag} final"
            )
        card = self._card(cand)
        version, decision = self._register(cand, card)
        test = cand.data.splits.get("test")
        if test is not None:
            # After every decision: the one look at test, stored with the version.
            accumulator = MetricAccumulator(card.evaluation.threshold)
            metrics = self._score(cand, cand.model, test, "test", accumulator)
            card = card.with_test(metrics)
            self._log_checkpoint(cand.run_id, engine.clone_model(cand.model).eval(), card)
            self.tracker.log_metrics(cand.run_id, metrics, step=cand.retraining.recipe.epochs)
            self._log_roc(cand.run_id, accumulator, metrics, "test")
            self.tracker.set_version_tags(plan.model_name, version, card.tags())
            self.tracker.set_version_description(
                plan.model_name, version, card.markdown(_predict_command(plan, version))
            )
            key = _test_key(plan)
            _say(
                f"{cand.tag} {key} {metrics.get(key, math.nan):.4f} (scored once, decides nothing)"
            )
        return version, decision, card

    def _log_roc(
        self, run_id: str, accumulator: MetricAccumulator, metrics: dict[str, float], split: str
    ) -> None:
        fpr, tpr = accumulator.roc()
        payload = {
            "split": split,
            "auc": metrics[f"{split}/auc"],
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
        }
        self.tracker.log_text(run_id, json.dumps(payload), ROC_ARTIFACT)

    def _card(self, cand: Candidate) -> ModelCard:
        plan, rt = self.plan, cand.retraining
        train = rt.training_view(_final_train(plan, cand.data))
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

    def _register(self, cand: Candidate, card: ModelCard) -> tuple[str, str]:
        """Log the CPU model and its checkpoint, register a version, set the aliases.

        The champion gate reads validation values only. A version whose tags or aliases could
        not be set is deleted again.
        """
        plan, tracker = self.plan, self.tracker
        model = engine.clone_model(cand.model).eval()
        self._log_checkpoint(cand.run_id, model, card)
        uri, model_id = tracker.log_pytorch_model(
            cand.run_id, model, _example(cand.data), _requirements()
        )
        version = None
        try:
            version = tracker.register_version(
                plan.model_name, uri, model_id, cand.run_id, card.tags()
            )
            tracker.set_version_description(
                plan.model_name, version, card.markdown(_predict_command(plan, version))
            )
            tracker.set_alias(plan.model_name, CHALLENGER, version)
            champion = tracker.version_by_alias(plan.model_name, CHAMPION)
            moves, decision = decide_champion(
                version, card.selection_value, champion, plan.selection, plan.maximize
            )
            if moves:
                tracker.set_alias(plan.model_name, CHAMPION, version)
        except BaseException:
            if version is not None:
                tracker.delete_version(plan.model_name, version)
            raise
        _say(decision)
        return version, decision

    def _log_checkpoint(self, run_id: str, model: torch.nn.Module, card: ModelCard) -> None:
        """The checkpoint with its card, and the bare weights for users without mapnet-tune."""
        folder = str(Path(CHECKPOINT_ARTIFACT).parent)
        with tempfile.TemporaryDirectory() as tmp:
            path = checkpoint.save(Path(tmp) / Path(CHECKPOINT_ARTIFACT).name, model, card)
            self.tracker.log_file(run_id, path, folder)
            torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
            self.tracker.log_file(run_id, Path(tmp) / "state_dict.pt", folder)

    def _table(self, rows: list[tuple[Candidate, str, ModelCard]]) -> str:
        plan = self.plan
        aliases = {v.version: v.aliases for v in self.tracker.versions(plan.model_name)}
        test_key = _test_key(plan)
        head = [
            "trial",
            "recipe",
            "search " + plan.config.objective.metric,
            plan.selection,
            f"{test_key} (once, after the decision)",
            "version",
            "aliases",
            "mlflow run",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cand, version, card in rows:
            test = f"{card.test[test_key]:.4f}" if test_key in card.test else "-"
            lines.append(
                f"| t{cand.trial.number:04d} | {card.recipe} | {cand.trial.value:.4f} | "
                f"{card.selection_value:.4f} | {test} | {version} | "
                f"{', '.join(aliases.get(version, ())) or '-'} | {cand.run_id} |"
            )
        trained = "; ".join(sorted({f"{card.recipe}: {card.training}" for _, _, card in rows}))
        return f"{plan.model_name} ({trained}):\n" + "\n".join(lines)


def _test_key(plan: Plan) -> str:
    """The objective on the test split: ``test/iou``."""
    return "test/" + plan.config.objective.metric.split("/", 1)[1]


def _predict_command(plan: Plan, version: str) -> str:
    return f"mapnet-tune predict --model models:/{plan.model_name}/{version} IMAGES... --out DIR"


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


def _best(cands: list[Candidate], key: str, maximize: bool) -> Candidate:
    finite = [c for c in cands if math.isfinite(c.validation.get(key, math.nan))] or cands
    pick = max if maximize else min
    return pick(finite, key=lambda c: c.validation.get(key, math.nan))


def _example(data: PreparedDataset) -> np.ndarray:
    """A (1, C, S, S) input example: the centre of a training image, S a multiple of 16."""
    image = data.splits["train"].images[0]
    _, height, width = image.shape
    side = min(EXAMPLE_SIDE, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[:, top : top + side, left : left + side]
    padded = max(32, -(-side // 16) * 16)
    return np.pad(crop, ((0, 0), (0, padded - side), (0, padded - side)))[None].copy()


def _requirements() -> list[str]:
    """Pins for the logged model: the pickle needs this package and the same torch."""
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
    try:
        pins.append(f"mapnet-tune=={importlib.metadata.version('mapnet-tune')}")
    except importlib.metadata.PackageNotFoundError:
        pins.append("mapnet-tune")
    return pins
