"""retrain-best: from a finished study to a registered, usable model.

The top trials of a study are retrained at the resolution the model will be used at (the
study file's ``retrain`` section), on train + val, and scored on the test split with the
dataset's protocol. Each becomes a version of the registered model ``mapnet-<dataset>``; the
newest is the ``challenger`` and the ``champion`` alias moves only to a version that beats it.

Without a test split, nothing held out would remain once validation joins training, so a
configuration is then trained on the training split alone and selected on validation, unless
``--folds`` estimates it by cross-validation over train + val instead.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from mapnet_tune import checkpoint, engine
from mapnet_tune.config import StudyConfig, check_channels, load_study
from mapnet_tune.data import PreparedDataset, Split, prepare
from mapnet_tune.data.augment import augmentation_for
from mapnet_tune.data.splits import concat, take
from mapnet_tune.errors import UserError
from mapnet_tune.metrics import MetricAccumulator
from mapnet_tune.predict import CHECKPOINT_ARTIFACT, THRESHOLD
from mapnet_tune.search import (
    build_model,
    load_existing_study,
    params_for_log,
    ranked_trials,
    trial_params,
    trial_seed,
)
from mapnet_tune.tracking import ModelVersionInfo, Tracker, git_sha

CHAMPION, CHALLENGER = "champion", "challenger"
ROC_ARTIFACT = "evaluation/roc.json"
EXAMPLE_SIDE = 64


@dataclass(frozen=True)
class RetrainRequest:
    """What one ``mapnet-tune retrain-best`` needs."""

    study_name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    top_k: int = 3
    folds: int | None = None
    force: bool = False
    config: Path | None = None
    source: str | None = None
    device: str | None = None


@dataclass
class Candidate:
    """One trial's configuration as it is retrained."""

    trial: optuna.trial.FrozenTrial
    params: dict[str, Any]
    seed: int
    batch_size: int
    run_id: str = ""
    cv: dict[str, float] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """``t0007``."""
        return f"t{self.trial.number:04d}"


@dataclass
class Plan:
    """Everything checked before the first run is created."""

    study: optuna.Study
    config: StudyConfig
    data: PreparedDataset
    options: dict[str, Any]
    candidates: list[Candidate]
    skipped: list[str]
    model_name: str
    folds: list[np.ndarray] | None
    request: RetrainRequest

    @property
    def has_test(self) -> bool:
        """Whether the prepared dataset has a test split."""
        return "test" in self.data.splits

    @cached_property
    def merged(self) -> Split:
        """Train + val, for the final model (with a test split) and the folds."""
        return concat([self.data.splits["train"], self.data.splits["val"]])

    @property
    def selection(self) -> str:
        """The objective metric on the split the champion is chosen by: test when present."""
        name = self.config.objective.metric.split("/", 1)[1]
        return f"{'test' if self.has_test else 'val'}/{name}"

    @property
    def maximize(self) -> bool:
        """Whether larger selection values are better."""
        return self.config.objective.direction == "maximize"

    @property
    def window(self) -> int:
        """The sliding window: the training patch side (64 when training on whole images)."""
        return self.data.splits["train"].patch_size or 64


def retrain_best(req: RetrainRequest) -> str:
    """Retrain the top trials of a study, score them and register them with aliases.

    Args:
        req: The study, how many trials, cross-validation folds, and whether to retrain
            trials that are registered already.

    Returns:
        The summary for the user: notes, skipped trials, the champion decisions and a table.

    Raises:
        UserError: An unknown or empty study, a study without completed trials, a study file
            that does not match the study, or data that cannot be prepared. Nothing is
            created in MLflow in those cases.
    """
    tracker = Tracker(req.tracking_uri)
    tracker.check_reachable()
    study, config, chosen, skipped = _choose_trials(req, tracker)
    if not chosen:
        return "\n".join([*skipped, "nothing to retrain"])
    plan = make_plan(req, study, config, chosen, skipped)
    lines = list(plan.skipped)
    if not plan.has_test:
        lines.append(_no_test_note(plan))
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
        for v in tracker.versions(f"mapnet-{config.dataset.name}")
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
    if req.folds is not None and skipped and chosen:
        # With folds the top trials compete as a group and only the winner is registered, so
        # a registered member means this group was decided already.
        skipped.append(
            f"{', '.join(f't{t.number:04d}' for t in chosen)} not cross-validated again: "
            f"a registered trial among the top {req.top_k} means the comparison was made; "
            f"pass --force to repeat it"
        )
        chosen = []
    return study, config, chosen, skipped


def make_plan(
    req: RetrainRequest,
    study: optuna.Study,
    config: StudyConfig,
    trials: list[optuna.trial.FrozenTrial],
    skipped: list[str],
) -> Plan:
    """Prepare the retraining data and check every trial against it; create nothing.

    Raises:
        UserError: Data that cannot be prepared, bad ``--folds``, or a batch too large.
    """
    options = {**config.dataset.options, **config.retrain.dataset_options}
    try:
        data = prepare(config.dataset.name, req.source or config.dataset.source, options)
    except UserError as exc:
        raise UserError(
            f"{exc} (retraining data of {config.path}: dataset.options with "
            f"retrain.dataset_options over them)"
        ) from None
    check_channels(config, data.channels)
    plan = Plan(
        study=study,
        config=config,
        data=data,
        options=options,
        candidates=[],
        skipped=skipped,
        model_name=f"mapnet-{config.dataset.name}",
        folds=None,
        request=req,
    )
    if req.folds is not None:
        plan.folds = _folds(len(plan.merged.images), req.folds, config.sampler.seed)
    plan.candidates = [_candidate(plan, trial) for trial in trials]
    return plan


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


def _folds(count: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint, seeded, nearly equal sets of image indices covering ``range(count)``."""
    if not 2 <= k <= count:
        raise UserError(
            f"--folds {k} needs between 2 and {count} folds: train + val has {count} images"
        )
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, k)]


def _rest(split: Split, fold: np.ndarray) -> np.ndarray:
    """The image indices of ``split`` outside ``fold``: a fold's training images."""
    return np.setdiff1d(np.arange(len(split.images)), fold)


def _samples(split: Split, images: np.ndarray) -> int:
    """Training samples (patches, else whole images) among the given images of a split."""
    if split.patches is None:
        return len(images)
    return int(np.isin(split.patches[:, 0], images).sum())


def _candidate(plan: Plan, trial: optuna.trial.FrozenTrial) -> Candidate:
    """The trial's full parameters and retraining batch size, checked against the data."""
    config = plan.config
    params = trial_params(optuna.trial.FixedTrial(trial.params), config, trial.user_attrs)
    batch = max(1, round(int(params["batch_size"]) * config.retrain.batch_scale))
    final = _final_train(plan)
    counts = [_samples(final, np.arange(len(final.images)))]
    counts += [_samples(plan.merged, _rest(plan.merged, fold)) for fold in plan.folds or []]
    fewest = min(counts)
    if batch > fewest:
        raise UserError(
            f"trial {trial.number}'s batch size {params['batch_size']} x "
            f"retrain.batch_scale {config.retrain.batch_scale:g} = {batch} is more "
            f"than the {fewest} training samples available; lower "
            f"retrain.batch_scale in {config.path} or use fewer --folds"
        )
    return Candidate(
        trial=trial,
        params=params,
        batch_size=batch,
        seed=trial_seed(config.sampler.seed, trial.number),
    )


def _final_train(plan: Plan) -> Split:
    """Train + val, except without a test split and folds, where val must stay held out."""
    if plan.has_test or plan.folds is not None:
        return plan.merged
    return plan.data.splits["train"]


def _no_test_note(plan: Plan) -> str:
    how = (
        f"the {len(plan.folds)}-fold cross-validated mean over train + val"
        if plan.folds is not None
        else "the val split, with models trained on train only"
    )
    return (
        f"note: dataset {plan.data.name} has no test split here (fingerprint "
        f"{plan.data.fingerprint}); models are selected on {plan.selection} from {how}, "
        f"and no test numbers are reported"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Runner:
    """Creates the runs, trains, scores and registers; every run ends with its true status."""

    def __init__(self, plan: Plan, tracker: Tracker) -> None:
        self.plan, self.tracker = plan, tracker
        self.device = engine.pick_device(plan.request.device)
        self.experiment_id = ""
        self.parent = ""
        self.running: list[str] = []

    def run(self) -> list[str]:
        """Retrain every candidate (or the cross-validation winner) and register it.

        Returns:
            Summary lines: champion decisions and the table of new versions.
        """
        plan = self.plan
        self.experiment_id = self.tracker.experiment(plan.study.study_name)
        self.parent = self._start(f"{plan.data.name}-retrain", self._tags("retrain"))
        self.tracker.log_params(
            self.parent,
            {
                **self._settings(),
                "top_k": plan.request.top_k,
                "force": plan.request.force,
                "trials": ",".join(c.tag for c in plan.candidates),
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
            "dataset.fingerprint": self.plan.data.fingerprint,
            "git.sha": git_sha(),
        }
        if cand is not None:
            tags["optuna.trial"] = str(cand.trial.number)
        return tags

    def _settings(self) -> dict[str, Any]:
        plan, rt = self.plan, self.plan.config.retrain
        return {
            "retrain.epochs": rt.epochs,
            "retrain.batch_scale": rt.batch_scale,
            "retrain.eval_protocol": rt.eval_protocol,
            "retrain.eval_stride": rt.eval_stride,
            "retrain.eval_window": plan.window,
            "retrain.folds": len(plan.folds or []),
            "retrain.selection": plan.selection,
            "retrain.train_resolution": _resolution(_final_train(plan)),
            "retrain.has_test": plan.has_test,
            **{f"dataset.{k}": v for k, v in sorted(plan.options.items())},
        }

    def _run_candidates(self) -> list[str]:
        plan = self.plan
        for cand in plan.candidates:
            cand.run_id = self._start(
                f"{plan.data.name}-retrain-{cand.tag}",
                {
                    **self._tags("retrain-trial", cand),
                    "mapnet_tune.search_run": cand.trial.user_attrs.get("mlflow_run_id", ""),
                },
                self.parent,
            )
            self.tracker.log_params(
                cand.run_id,
                {
                    **params_for_log(cand.params),
                    **self._settings(),
                    "seed": cand.seed,
                    "batch_size": cand.batch_size,
                    "device": str(self.device),
                },
            )
        chosen = plan.candidates
        lines = []
        if plan.folds is not None:
            for cand in plan.candidates:
                self._cross_validate(cand)
            key = f"cv/{plan.config.objective.metric}_mean"
            chosen = [_best(plan.candidates, key, plan.maximize)]
            lines.append(self._cv_table(chosen[0], key))
            for cand in plan.candidates:
                if cand is not chosen[0]:
                    self._finish(cand.run_id, f"not registered: {chosen[0].tag} has the best {key}")
        rows = []
        for cand in chosen:
            version, decision, value = self._final(cand)
            self._finish(cand.run_id)
            lines.append(
                f"{cand.tag} registered as {plan.model_name} version {version}: {decision}"
            )
            rows.append((cand, version, value))
        return [*lines, "", self._table(rows)]

    def _train(self, cand: Candidate, train: Split, run_id: str, label: str) -> torch.nn.Module:
        """A fresh model trained on ``train`` for the retrain epochs; the final weights."""
        config = self.plan.config
        torch.manual_seed(cand.seed)
        model = build_model(config, self.plan.data.channels)
        settings = engine.TrainSettings(
            epochs=config.retrain.epochs,
            batch_size=cand.batch_size,
            lr=cand.params["lr"],
            pos_weight=cand.params["pos_weight"],
            seed=cand.seed,
        )

        def on_epoch(epoch: int, metrics: dict[str, float], _: torch.nn.Module,
                     __: bool) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            _say(f"{label} epoch {epoch + 1}/{settings.epochs} loss {metrics['train/loss']:.4f}")

        engine.fit(
            model,
            train,
            None,
            settings,
            augment=augmentation_for(cand.params, self.plan.data.channels, cand.seed,
                                     self.device),
            on_epoch=on_epoch,
            device=self.device,
        )
        return model

    def _score(
        self,
        model: torch.nn.Module,
        split: Split,
        prefix: str,
        accumulator: MetricAccumulator | None = None,
    ) -> dict[str, float]:
        rt = self.plan.config.retrain
        return engine.evaluate(
            model,
            split,
            rt.eval_protocol,
            prefix,
            device=self.device,
            stride=rt.eval_stride,
            batch_size=rt.eval_batch_size,
            legacy=True,
            window=self.plan.window,
            accumulator=accumulator,
        )

    def _cross_validate(self, cand: Candidate) -> None:
        """Train on all folds but one, score the one left out; log each fold and the summary."""
        plan = self.plan
        merged = plan.merged
        scores: list[dict[str, float]] = []
        for index, fold in enumerate(plan.folds or []):
            name = f"{plan.data.name}-retrain-{cand.tag}-fold{index + 1}"
            run_id = self._start(
                name,
                {**self._tags("retrain-fold", cand), "mapnet_tune.fold": str(index + 1)},
                cand.run_id,
            )
            self.tracker.log_params(run_id, {"held_out": ",".join(merged.names[i] for i in fold)})
            model = self._train(
                cand,
                take(merged, _rest(merged, fold)),
                run_id,
                f"{cand.tag} fold {index + 1}/{len(plan.folds)}",
            )
            metrics = self._score(model, take(merged, fold), "val")
            self.tracker.log_metrics(run_id, metrics, step=plan.config.retrain.epochs)
            self._finish(run_id)
            scores.append(metrics)
        for key in scores[0]:
            values = np.array([s[key] for s in scores], dtype=float)
            cand.cv[f"cv/{key}_mean"] = float(np.mean(values))
            cand.cv[f"cv/{key}_std"] = float(np.std(values))
        self.tracker.log_metrics(cand.run_id, cand.cv, step=plan.config.retrain.epochs)
        key = plan.config.objective.metric
        _say(
            f"{cand.tag} {len(scores)}-fold {key} {cand.cv[f'cv/{key}_mean']:.4f} "
            f"+- {cand.cv[f'cv/{key}_std']:.4f}"
        )

    def _cv_table(self, chosen: Candidate, key: str) -> str:
        std = key.removesuffix("_mean") + "_std"
        rows = [
            f"{c.tag}: {key.removeprefix('cv/')} {c.cv[key]:.4f} +- {c.cv[std]:.4f} "
            f"(mean +- std over {len(self.plan.folds or [])} folds)"
            for c in self.plan.candidates
        ]
        return "\n".join([*rows, f"chosen by the mean: {chosen.tag}"])

    def _final(self, cand: Candidate) -> tuple[str, str, float]:
        """Train the registered model, score it, log it and register it with its aliases."""
        plan = self.plan
        model = self._train(cand, _final_train(plan), cand.run_id, f"{cand.tag}")
        accumulator = MetricAccumulator()
        if plan.has_test:
            metrics = self._score(model, plan.data.splits["test"], "test", accumulator)
        elif plan.folds is None:
            metrics = self._score(model, plan.data.splits["val"], "val", accumulator)
        else:
            # The cross-validated means stand in for validation numbers of the final model.
            metrics = {
                k.removeprefix("cv/").removesuffix("_mean"): v
                for k, v in cand.cv.items()
                if k.endswith("_mean")
            }
            accumulator = None
        self.tracker.log_metrics(cand.run_id, metrics, step=plan.config.retrain.epochs)
        if accumulator is not None:
            fpr, tpr = accumulator.roc()
            split = plan.selection.split("/")[0]
            self.tracker.log_text(
                cand.run_id,
                json.dumps(
                    {
                        "split": split,
                        "auc": metrics[f"{split}/auc"],
                        "fpr": fpr.tolist(),
                        "tpr": tpr.tolist(),
                    }
                ),
                ROC_ARTIFACT,
            )
        value = metrics.get(plan.selection, math.nan)
        _say(f"{cand.tag} {plan.selection} {value:.4f}")
        version, decision = self._register(cand, engine.clone_model(model).eval(), metrics)
        return version, decision, value

    def _meta(self, cand: Candidate, metrics: dict[str, float]) -> dict[str, Any]:
        plan, rt = self.plan, self.plan.config.retrain
        train = _final_train(plan)
        return {
            "dataset": plan.data.name,
            "dataset_options": plan.options,
            "settings": plan.data.settings,
            "fingerprint": plan.data.fingerprint,
            "train_resolution": _resolution(train),
            "patch_size": train.patch_size,
            "eval_protocol": rt.eval_protocol,
            "eval_stride": rt.eval_stride,
            "eval_window": self.plan.window,
            "eval_batch_size": rt.eval_batch_size,
            "threshold": THRESHOLD,
            "trained_on": "train+val" if train is not plan.data.splits["train"] else "train",
            "study": plan.study.study_name,
            "trial": cand.trial.number,
            "params": cand.params,
            "batch_size": cand.batch_size,
            "selection_metric": plan.selection,
            "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
        }

    def _register(
        self, cand: Candidate, model: torch.nn.Module, metrics: dict[str, float]
    ) -> tuple[str, str]:
        """Log the CPU model and its checkpoint, register a version, set the aliases.

        A version whose tags or aliases could not be set is deleted again.
        """
        plan, tracker = self.plan, self.tracker
        meta = self._meta(cand, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = checkpoint.save(Path(tmp) / Path(CHECKPOINT_ARTIFACT).name, model, meta)
            torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
            tracker.log_file(cand.run_id, path, str(Path(CHECKPOINT_ARTIFACT).parent))
            tracker.log_file(
                cand.run_id, Path(tmp) / "state_dict.pt", str(Path(CHECKPOINT_ARTIFACT).parent)
            )
        uri, model_id = tracker.log_pytorch_model(
            cand.run_id, model, _example(plan), _requirements()
        )
        version = None
        try:
            version = tracker.register_version(
                plan.model_name, uri, model_id, cand.run_id, _version_tags(meta, cand.cv, git_sha())
            )
            tracker.set_alias(plan.model_name, CHALLENGER, version)
            champion = tracker.version_by_alias(plan.model_name, CHAMPION)
            moves, decision = decide_champion(
                version,
                metrics.get(plan.selection, math.nan),
                champion,
                plan.selection,
                plan.maximize,
            )
            if moves:
                tracker.set_alias(plan.model_name, CHAMPION, version)
        except BaseException:
            if version is not None:
                tracker.delete_version(plan.model_name, version)
            raise
        _say(decision)
        return version, decision

    def _table(self, rows: list[tuple[Candidate, str, float]]) -> str:
        plan = self.plan
        aliases = {v.version: v.aliases for v in self.tracker.versions(plan.model_name)}
        head = [
            "trial",
            "search " + plan.config.objective.metric,
            plan.selection,
            "version",
            "aliases",
            "mlflow run",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cand, version, value in rows:
            lines.append(
                f"| {cand.tag} | {cand.trial.value:.4f} | {value:.4f} | {version} | "
                f"{', '.join(aliases.get(version, ())) or '-'} | {cand.run_id} |"
            )
        return f"{plan.model_name}, trained at {_resolution(_final_train(plan))}:\n" + "\n".join(
            lines
        )


def decide_champion(
    version: str, value: float, champion: ModelVersionInfo | None, metric: str, maximize: bool
) -> tuple[bool, str]:
    """Whether the champion alias moves to a new version, and why, in words.

    The champion's value is read from its ``metric.<name>`` tag. Ties keep the champion.

    Args:
        version: The new version.
        value: Its selection metric.
        champion: The current champion, if any.
        metric: The selection metric, e.g. ``test/iou``.
        maximize: Whether larger is better.

    Returns:
        (moves, e.g. "champion moves to version 3 (test/iou 0.8123 > 0.8011 of version 2)").
    """
    moves, stays = f"champion moves to version {version}", "champion stays version"
    if champion is None:
        return True, f"{moves} (the first champion; {metric} {value:.4f})"
    if not math.isfinite(value):
        return False, f"{stays} {champion.version} (version {version} has no finite {metric})"
    held = float(champion.tags.get(f"metric.{metric}", "nan"))
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
    finite = [c for c in cands if math.isfinite(c.cv.get(key, math.nan))] or cands
    pick = max if maximize else min
    return pick(finite, key=lambda c: c.cv.get(key, math.nan))


def _resolution(split: Split) -> str:
    """``256x256 patches`` or ``584x565 images``: what the model sees while training."""
    if split.patch_size is not None:
        return f"{split.patch_size}x{split.patch_size} patches"
    _, _, height, width = split.images.shape
    return f"{height}x{width} images"


def _example(plan: Plan) -> np.ndarray:
    """A (1, C, S, S) input example: the centre of a training image, S a multiple of 16."""
    image = plan.data.splits["train"].images[0]
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


def _version_tags(meta: dict[str, Any], cv: dict[str, float], sha: str) -> dict[str, Any]:
    """Model-version tags: provenance, parameters, metrics, resolution and preprocessing."""
    settings = {k: v for k, v in meta["settings"].items() if k != "notes"}
    return {
        "study": meta["study"],
        "trial": meta["trial"],
        "dataset": meta["dataset"],
        "dataset.fingerprint": meta["fingerprint"],
        "git.sha": sha,
        "trained_on": meta["trained_on"],
        "train_resolution": meta["train_resolution"],
        "eval_protocol": meta["eval_protocol"],
        "eval_stride": meta["eval_stride"],
        "eval_window": meta["eval_window"],
        "selection_metric": meta["selection_metric"],
        "dataset.options": json.dumps(meta["dataset_options"], sort_keys=True),
        "preprocessing": json.dumps(settings, sort_keys=True),
        "batch_size": meta["batch_size"],
        **{f"param.{k}": v for k, v in meta["params"].items()},
        **{
            f"metric.{k}": repr(float(v))
            for k, v in {**meta["metrics"], **cv}.items()
            if math.isfinite(v)
        },
    }
