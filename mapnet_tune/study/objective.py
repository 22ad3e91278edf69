"""The objective: one trial from suggestion to a number Optuna records, with its MLflow run.

A trial's epoch callback is composed from small ones (log, summary, overlay, progress, prune,
deadline), each doing one thing, in that order.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
import traceback
from typing import Any

import optuna
import torch

from mapnet_tune import engine
from mapnet_tune.data import PreparedDataset
from mapnet_tune.engine import EpochCallback
from mapnet_tune.names import (
    FINGERPRINT_TAG,
    GIT_TAG,
    OVERLAY_ARTIFACT,
    OVERLAY_EPOCH_TAG,
    ROLE_TAG,
    RUN_ID_ATTR,
    SEARCH_SOURCE,
    STUDY_TAG,
    TRIAL_TAG,
    params_for_log,
    summary_key,
    trial_tag,
)
from mapnet_tune.recipe import (
    augmentation,
    build_model,
    search_evaluation,
    search_settings,
    suggest,
    trial_seed,
)
from mapnet_tune.study.progress import Progress
from mapnet_tune.study.recovery import SurplusTrial, claim_slot
from mapnet_tune.study.request import SearchRequest, StudyTimeout
from mapnet_tune.tracking import Tracker, git_sha
from mapnet_tune.viz import overlay_panel

#: Validation images shown in a trial's best-epoch overlay.
OVERLAY_IMAGES = 4


def chain(*callbacks: EpochCallback) -> EpochCallback:
    """One epoch callback that calls ``callbacks`` in order."""

    def call(epoch: int, metrics: dict[str, float], model: torch.nn.Module, improved: bool):
        for callback in callbacks:
            callback(epoch, metrics, model, improved)

    return call


def log_epoch(tracker: Tracker, run_id: str) -> EpochCallback:
    """Log every epoch's metrics to the trial's run, the epoch as the step."""

    def call(epoch: int, metrics: dict[str, float], _: torch.nn.Module, __: bool) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)

    return call


def show_epoch(progress: Progress, trial: optuna.Trial, epochs: int, metric: str) -> EpochCallback:
    """Print one progress line per epoch."""

    def call(epoch: int, metrics: dict[str, float], _: torch.nn.Module, __: bool) -> None:
        progress.line(
            f"{trial_tag(trial.number)} epoch {epoch + 1}/{epochs} "
            f"loss {metrics['train/loss']:.4f} {metric} {metrics[metric]:.4f}"
        )

    return call


def prune(trial: optuna.Trial, metric: str) -> EpochCallback:
    """Report the epoch's objective to Optuna and stop the trial when the pruner says so."""

    def call(epoch: int, metrics: dict[str, float], _: torch.nn.Module, __: bool) -> None:
        value = metrics[metric]
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch + 1} with {metric} {value:.4f}")

    return call


def stop_at(deadline: float | None) -> EpochCallback:
    """Stop the study (as ``--timeout`` asks) once ``deadline`` (a ``time.time()``) passed."""

    def call(*_: object) -> None:
        if deadline is not None and time.time() > deadline:
            raise StudyTimeout

    return call


class Summary:
    """A trial's best and final validation metrics, logged as one-point summaries.

    As an epoch callback it remembers them; :meth:`log` writes ``val_best/*`` and
    ``val_final/*`` (see :func:`summary_key`), which a person adds as columns to sort trials.
    Pruned trials get them too, so that they sort with the others.
    """

    def __init__(self) -> None:
        self.best: tuple[int, dict[str, float]] | None = None
        self.final: tuple[int, dict[str, float]] | None = None

    def __call__(self, epoch: int, metrics: dict[str, float], _: torch.nn.Module, improved: bool):
        val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if val:
            self.final = epoch, val
            if improved:
                self.best = epoch, val

    def log(self, tracker: Tracker, run_id: str) -> None:
        """Write the summaries to the trial's run, each at the epoch it comes from."""
        for which, found in (("best", self.best), ("final", self.final)):
            if found is not None:
                epoch, val = found
                tracker.log_metrics(
                    run_id, {summary_key(k, which): v for k, v in val.items()}, step=epoch
                )


class Objective:
    """The trial function: suggest, build, fit, report, prune, log."""

    def __init__(
        self,
        req: SearchRequest,
        data: PreparedDataset,
        tracker: Tracker,
        experiment_id: str,
        parent_run_id: str,
        progress: Progress,
        deadline: float | None,
    ) -> None:
        self.req, self.data, self.tracker = req, data, tracker
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.progress, self.deadline = progress, deadline
        self.device = engine.pick_device(req.device)

    def __call__(self, trial: optuna.Trial) -> float:
        """Run one trial; its MLflow run ends FINISHED, KILLED (pruned) or FAILED."""
        try:
            claim_slot(trial, self.req.trials)
        except SurplusTrial:
            self.progress.line(f"{trial_tag(trial.number)} not needed: other workers fill it")
            raise
        study = self.req.study
        params = suggest(trial, study)
        seed = trial_seed(study.sampler.seed, trial.number)
        tags = {
            STUDY_TAG: self.req.study_name,
            TRIAL_TAG: str(trial.number),
            FINGERPRINT_TAG: self.data.fingerprint,
            GIT_TAG: git_sha(),
            ROLE_TAG: "trial",
        }
        name = f"{study.dataset.name}-{trial_tag(trial.number)}"
        run_id = self.tracker.create_run(
            self.experiment_id, name, tags, parent_run_id=self.parent_run_id, source=SEARCH_SOURCE
        )
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        self.tracker.log_dataset(run_id, self.data.name, self.data.fingerprint, self.data.source)
        self.tracker.log_params(
            run_id,
            {
                **params_for_log(params),
                **study.fixed_settings(),
                "seed": seed,
                "device": str(self.device),
            },
        )
        summary = Summary()
        try:
            with self.tracker.system_metrics(run_id, enabled=self.device.type == "cuda"):
                value = self._train(trial, params, seed, run_id, summary)
        except optuna.TrialPruned as exc:
            summary.log(self.tracker, run_id)
            self.tracker.end_run(run_id, "KILLED", str(exc))
            raise
        except KeyboardInterrupt as exc:
            why = "study time limit" if isinstance(exc, StudyTimeout) else "interrupted"
            self._requeue(trial, why)
            self.tracker.end_run(run_id, "KILLED", f"{why}; re-queued for the next run")
            raise
        except Exception as exc:
            reason = self._failure(trial, params, exc)
            trial.set_user_attr("fail_reason", reason)
            self.tracker.end_run(run_id, "FAILED", reason)
            self.progress.line(f"{trial_tag(trial.number)} FAILED: {reason}")
            raise
        self.tracker.end_run(run_id, "FINISHED")
        return value

    def _train(
        self, trial: optuna.Trial, params: dict[str, Any], seed: int, run_id: str, summary: Summary
    ) -> float:
        study = self.req.study
        torch.manual_seed(seed)
        model = build_model(study, self.data.channels)
        augment = augmentation(params, self.data.channels, seed, self.device)
        settings = search_settings(study, params, seed, self.data.splits["train"])
        metric = study.objective.metric
        on_epoch = chain(
            log_epoch(self.tracker, run_id),
            summary,
            self._overlay_when_improved(run_id),
            show_epoch(self.progress, trial, settings.epochs, metric),
            prune(trial, metric),
            stop_at(self.deadline),
        )
        train = self.data.splits["train"]
        unit = "patch" if train.patches is not None else "image"
        result = engine.fit(
            model,
            train,
            self.data.splits["val"],
            settings,
            augment=augment,
            on_epoch=on_epoch,
            device=self.device,
            on_step=self.progress.meter(trial.number, settings.epochs, unit, self.device),
        )
        if not result.best_metrics:
            raise RuntimeError(f"no epoch produced a finite {metric}")
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr(
            "metrics", {k: v for k, v in result.best_metrics.items() if math.isfinite(v)}
        )
        trial.set_user_attr("samples_per_s", result.samples_seen / max(result.seconds, 1e-9))
        summary.log(self.tracker, run_id)
        self.progress.line(
            f"{trial_tag(trial.number)} done: {metric} {result.best_metrics[metric]:.4f}"
            f" at epoch {result.best_epoch + 1}"
        )
        return result.best_metrics[metric]

    def _overlay_when_improved(self, run_id: str) -> EpochCallback:
        """Log the overlays of the best epoch so far (replacing the previous best's)."""

        def call(epoch: int, _: dict[str, float], model: torch.nn.Module, improved: bool):
            if improved:
                self._log_overlays(model, run_id, epoch)

        return call

    def _log_overlays(self, model: torch.nn.Module, run_id: str, epoch: int) -> None:
        val = self.data.splits["val"]
        n = min(OVERLAY_IMAGES, len(val.images))
        evaluation = search_evaluation(self.req.study, self.data.splits["train"])
        if evaluation.protocol == "patches":
            # Overlays show whole images; windows the size of the patches cover them.
            evaluation = dataclasses.replace(evaluation, protocol="sliding-window")
        probs = engine.predict(model, val.images[:n], evaluation, device=self.device)
        panel = overlay_panel(
            val.images[:n], val.masks[:n], probs.numpy(), None if val.fov is None else val.fov[:n]
        )
        self.tracker.log_image(run_id, panel, OVERLAY_ARTIFACT)
        self.tracker.set_tags(run_id, {OVERLAY_EPOCH_TAG: epoch})
        model.train()

    def _requeue(self, trial: optuna.Trial, why: str, params: dict[str, Any] | None = None) -> None:
        """Queue the same sampled values (or ``params``) again, so the configuration is not lost."""
        trial.study.enqueue_trial(
            dict(params or trial.params), user_attrs={"retry_of": trial.number, "retry_reason": why}
        )

    def _failure(self, trial: optuna.Trial, params: dict[str, Any], exc: Exception) -> str:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            gc.collect()
            torch.cuda.empty_cache()
            reason += "; " + self._retry_smaller(trial, params)
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        return reason

    def _retry_smaller(self, trial: optuna.Trial, params: dict[str, Any]) -> str:
        """Queue the trial's values with half the batch, if the search space holds that batch.

        The new trial then records the batch it really runs with, so the sampler learns a
        true point and export-best hands back a batch that fits.
        """
        half = int(params["batch_size"]) // 2
        spec = self.req.study.param("batch_size")
        fits = (
            half in spec.choices
            if spec.kind == "categorical"
            else spec.kind in ("int", "float") and spec.low <= half
        )
        if half < 1 or not fits:
            return (
                f"not re-queued: half the batch ({half}) is outside the search space of batch_size"
            )
        self._requeue(trial, "out of memory", {**trial.params, "batch_size": half})
        return f"re-queued with batch size {half}"
