"""The Optuna study: suggest, build, fit, report, prune, and hand the numbers to tracking.

Each worker process runs :func:`run_search`. Workers cooperate only through the Optuna
storage (trial numbers, the study-wide trial count, the parent run id) and the MLflow
store; there is no scheduler of our own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune import engine
from mapnet_tune.config import StudyConfig, check_channels, read_yaml
from mapnet_tune.data import PreparedDataset, prepare
from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.recipe import (
    augmentation,
    build_model,
    search_evaluation,
    search_settings,
    suggest,
    trial_seed,
)
from mapnet_tune.tracking import Tracker, git_sha
from mapnet_tune.viz import overlay_panel

DEFAULT_STORAGE = "sqlite:///optuna.db"
#: Trials that count towards ``--trials``: finished ones and those running right now (so two
#: workers do not both start the last trial). Failed trials do not count: they are retried.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Defaults of ``--heartbeat-interval`` and ``--grace-period``: a running trial records a
#: heartbeat this often, and one silent for the grace period counts as lost (worker killed,
#: machine gone), is marked failed and re-queued.
HEARTBEAT_S = 30
GRACE_S = 90
#: How often a lost trial is re-queued before its parameters are given up.
LOST_RETRIES = 2
#: A study stops when its most recent trials all failed this many times in a row: the cause
#: (a bug, a broken dataset, a batch that never fits) will not go away by sampling more.
MAX_CONSECUTIVE_FAILURES = 5
#: Longest pause between two looks at the study while a worker waits for others.
POLL_S = 5
PARENT_ATTR = "mlflow_parent_run_id"
#: How long a worker that did not create the study waits for its creator's parent run.
PARENT_WAIT_S = 60
#: User attribute of a trial handed back unrun because the study was already full.
SURPLUS_ATTR = "surplus"
# Workers starting together on a new database race to create Optuna's tables; the losers
# find them created on a later try.
_SCHEMA_TRIES = 3
OVERLAY_IMAGES = 4

# Optuna logs a full traceback for every failed trial; we print one line per failure
# ourselves and keep the traceback in the trial's user attributes.
optuna.logging.set_verbosity(optuna.logging.ERROR)


class StudyTimeout(KeyboardInterrupt):
    """``--timeout`` ran out mid-trial. Handled like Ctrl-C: the trial is re-queued."""


class SurplusTrial(Exception):
    """Lower-numbered trials already fill the study, so this one is handed back unrun."""


def resolve_storage(storage: str | None) -> str:
    """``storage``, else ``$MAPNET_TUNE_STORAGE``, else ``sqlite:///optuna.db`` in the cwd."""
    return storage or os.environ.get("MAPNET_TUNE_STORAGE") or DEFAULT_STORAGE


def open_storage(url: str, heartbeat: bool = True, *, heartbeat_s: int = HEARTBEAT_S,
                 grace_s: int = GRACE_S,
                 on_lost: Callable[[optuna.Study, FrozenTrial], None] | None = None,
                 ) -> optuna.storages.RDBStorage:
    """An RDB storage, with heartbeats so that a lost worker's trial is failed and retried.

    Args:
        url: An SQLAlchemy URL.
        heartbeat: Record heartbeats of running trials; off for commands that only read.
        heartbeat_s: Seconds between two heartbeats of a running trial.
        grace_s: Seconds without a heartbeat after which a running trial counts as lost.
        on_lost: Called by whichever worker finds a lost trial, once it is marked failed;
            by default the trial is re-queued.

    Raises:
        UserError: When the database cannot be reached, or the grace period is too short.
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several processes may share one SQLite file; wait for locks instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    with warnings.catch_warnings():
        # Heartbeats are marked experimental; they are what makes crash recovery work.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat:
            if grace_s <= heartbeat_s:
                raise UserError(f"--grace-period ({grace_s} s) must be longer than "
                                f"--heartbeat-interval ({heartbeat_s} s), or live trials would "
                                f"count as lost")
            kwargs.update(heartbeat_interval=heartbeat_s, grace_period=grace_s,
                          heartbeat_stale_trial_callback=on_lost or _retry_lost())
        attempt = 1
        while True:
            try:
                return optuna.storages.RDBStorage(url, **kwargs)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
                if attempt == _SCHEMA_TRIES:
                    raise _storage_error(url, exc) from None
                time.sleep(attempt)
                attempt += 1
            except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
                raise _storage_error(url, exc) from None


def _storage_error(url: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"Optuna storage {redact_url(url)} cannot be opened ({first}); check the "
                     f"URL (e.g. postgresql+psycopg2://user@host/db) and that the database "
                     f"is running, or pass --storage / set MAPNET_TUNE_STORAGE")


def _retry_lost() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=LOST_RETRIES)


class LostTrialCallback:
    """Re-queue a trial whose worker stopped sending heartbeats; mark its MLflow run FAILED.

    Optuna calls it in whichever worker finds the stale trial, after marking the trial
    FAIL, so a run is not left RUNNING when its worker was killed or its machine lost.

    Args:
        tracker: Where the lost trial's run lives.
        grace_s: The grace period, for the message.
    """

    def __init__(self, tracker: Tracker, grace_s: int) -> None:
        self.tracker, self.grace_s = tracker, grace_s
        self.retry = _retry_lost()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Re-queue ``trial`` (up to ``LOST_RETRIES`` times) and end its run as FAILED."""
        requeued = len(trial.system_attrs.get("retry_history", [])) < LOST_RETRIES
        self.retry(study, trial)
        why = (f"worker lost: no heartbeat for {self.grace_s} s; "
               f"{'re-queued' if requeued else f'not re-queued after {LOST_RETRIES} retries'}")
        print(f"t{trial.number:04d} FAILED: {why}", file=sys.stderr, flush=True)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            return
        try:
            self.tracker.end_run(run_id, "FAILED", why)
        except Exception as exc:  # an old run must not stop a live worker
            print(f"warning: could not mark MLflow run {run_id} FAILED: {exc}",
                  file=sys.stderr, flush=True)


def load_existing_study(storage: str | None, name: str | None) -> optuna.Study:
    """A study that must already exist; with no name, the storage's only study.

    Raises:
        UserError: Listing the studies that do exist.
    """
    url = resolve_storage(storage)
    store = open_storage(url, heartbeat=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if name is None and len(names) == 1:
        name = names[0]
    elif name is None:
        raise UserError(f"{redact_url(url)} holds {len(names)} studies; pass --study NAME with one "
                        f"of: {', '.join(sorted(names)) or '(none: run mapnet-tune search first)'}")
    if name not in names:
        raise UserError(f"no study '{name}' in {redact_url(url)}; existing studies: "
                        f"{', '.join(sorted(names)) or '(none)'}; pass --study NAME or --storage")
    return optuna.load_study(study_name=name, storage=store)


def default_study_name(study: StudyConfig) -> str:
    """The dataset name for a shipped study file, else ``<dataset>-<file stem>``."""
    stem = Path(study.path).stem
    return stem if stem == study.dataset.name else f"{study.dataset.name}-{stem}"


@dataclass(frozen=True)
class SearchRequest:
    """Everything one ``mapnet-tune search`` worker needs."""

    study: StudyConfig
    study_name: str
    storage: str
    tracking_uri: str | None
    trials: int
    timeout_s: float | None = None
    enqueue: Path | None = None
    source: str | None = None
    device: str | None = None
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S


def _sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    def make(seed: int) -> optuna.samplers.BaseSampler:
        if study.sampler.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed,
                                          n_startup_trials=study.sampler.n_startup_trials)

    return TrialSeededSampler(make, study.sampler.seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler made anew for every trial, seeded from the study seed and the trial number.

    One seeded stream per worker would make workers that share a study propose the same
    parameters, and a resumed study repeat its first proposals. Per-trial seeds give each
    trial its own stream, whichever worker runs it. Optuna's samplers keep no state between
    trials but their random state (the history comes from the storage), so nothing is lost.

    Args:
        make: Builds the underlying sampler from a seed.
        seed: The study seed.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Seed a fresh sampler for ``trial``."""
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        """As the underlying sampler."""
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict) -> dict[str, Any]:
        """As the underlying sampler."""
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        """As the underlying sampler."""
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Any) -> None:
        """As the underlying sampler."""
        self._inner.after_trial(study, trial, state, values)


def _pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    p = study.pruner
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource,
                                              max_resource=study.train.epochs,
                                              reduction_factor=p.reduction_factor)
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def claim_slot(trial: optuna.Trial, target: int) -> None:
    """Hand ``trial`` back, unrun, when lower-numbered trials already reach ``target``.

    Workers count trials before asking for one, so two of them can both start the last
    one; the trial numbers, which the storage hands out one by one, decide which of them
    runs it. The other is marked FAIL (the one finished state that never counts as done)
    with the user attribute ``surplus``, left out of every count and report, and, if it
    came from the queue, its parameters are queued again.

    Raises:
        SurplusTrial: When the trial is not needed.
    """
    trials = trial.study.get_trials(deepcopy=False)
    ahead = sum(t.number < trial.number and t.state in COUNTED for t in trials)
    if ahead < target:
        return
    own = next(t for t in trials if t.number == trial.number)
    queued = {**own.system_attrs.get("fixed_params", {}), **own.params}
    if queued:
        trial.study.enqueue_trial(queued, user_attrs={
            k: v for k, v in own.user_attrs.items() if k != "mlflow_run_id"})
    trial.set_user_attr(SURPLUS_ATTR, True)
    raise SurplusTrial(f"{ahead} lower-numbered trials already reach --trials")


class Progress:
    """One status line per event on stderr: trial i of N, epoch, best so far, pruned/failed."""

    def __init__(self, study: optuna.Study, target: int, metric: str) -> None:
        self.study, self.target, self.metric = study, target, metric

    def line(self, text: str) -> None:
        """Print a progress line with the study-wide counters."""
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        failed = sum(t.state == TrialState.FAIL and not is_surplus(t) for t in trials)
        try:
            best = f"{self.study.best_value:.4f} (t{self.study.best_trial.number:04d})"
        except ValueError:
            best = "-"
        print(f"[{done}/{self.target} done | best {self.metric} {best} | pruned {pruned} "
              f"failed {failed}] {text}", file=sys.stderr, flush=True)


class Objective:
    """The trial function: suggest, build, fit, report, prune, log."""

    def __init__(self, req: SearchRequest, data: PreparedDataset, tracker: Tracker,
                 experiment_id: str, parent_run_id: str, progress: Progress,
                 deadline: float | None) -> None:
        self.req, self.data, self.tracker = req, data, tracker
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.progress, self.deadline = progress, deadline
        self.device = engine.pick_device(req.device)

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            claim_slot(trial, self.req.trials)
        except SurplusTrial:
            self.progress.line(f"t{trial.number:04d} not needed: other workers fill the study")
            raise
        study = self.req.study
        params = suggest(trial, study)
        seed = trial_seed(study.sampler.seed, trial.number)
        name = f"{study.dataset.name}-t{trial.number:04d}"
        run_id = self.tracker.create_run(self.experiment_id, name, {
            "optuna.study": self.req.study_name, "optuna.trial": str(trial.number),
            "dataset.fingerprint": self.data.fingerprint, "git.sha": git_sha(),
            "mapnet_tune.role": "trial"}, parent_run_id=self.parent_run_id)
        trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.log_params(run_id, {**params_for_log(params),
                                         **study.fixed_settings(), "seed": seed,
                                         "device": str(self.device)})
        monitor = self.tracker.system_metrics(run_id) if self.device.type == "cuda" else None
        try:
            value = self._train(trial, params, seed, run_id)
        except optuna.TrialPruned as exc:
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
            self.progress.line(f"t{trial.number:04d} FAILED: {reason}")
            raise
        finally:
            if monitor is not None:
                monitor.finish()
        self.tracker.end_run(run_id, "FINISHED")
        return value

    def _train(self, trial: optuna.Trial, params: dict[str, Any], seed: int, run_id: str) -> float:
        study = self.req.study
        torch.manual_seed(seed)
        model = build_model(study, self.data.channels)
        augment = augmentation(params, self.data.channels, seed, self.device)
        settings = search_settings(study, params, seed, self.data.splits["train"])
        metric = study.objective.metric

        def on_epoch(epoch: int, metrics: dict[str, float], net: torch.nn.Module,
                     improved: bool) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            value = metrics[metric]
            if improved:
                self._log_overlays(net, run_id, epoch)
            self.progress.line(f"t{trial.number:04d} epoch {epoch + 1}/{settings.epochs} "
                               f"loss {metrics['train/loss']:.4f} {metric} {value:.4f}")
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch + 1} with {metric} {value:.4f}")
            if self.deadline is not None and time.time() > self.deadline:
                raise StudyTimeout

        result = engine.fit(model, self.data.splits["train"], self.data.splits["val"], settings,
                            augment=augment, on_epoch=on_epoch, device=self.device)
        if not result.best_metrics:
            raise RuntimeError(f"no epoch produced a finite {metric}")
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("metrics", {k: v for k, v in result.best_metrics.items()
                                        if math.isfinite(v)})
        trial.set_user_attr("samples_per_s", result.samples_seen / max(result.seconds, 1e-9))
        self.tracker.log_metrics(run_id, {f"best/{k}": v for k, v in result.best_metrics.items()},
                                 step=result.best_epoch)
        self.progress.line(f"t{trial.number:04d} done: {metric} {result.best_metrics[metric]:.4f}"
                           f" at epoch {result.best_epoch + 1}")
        return result.best_metrics[metric]

    def _log_overlays(self, model: torch.nn.Module, run_id: str, epoch: int) -> None:
        val = self.data.splits["val"]
        n = min(OVERLAY_IMAGES, len(val.images))
        evaluation = search_evaluation(self.req.study, self.data.splits["train"])
        if evaluation.protocol == "patches":
            # Overlays show whole images; windows the size of the patches cover them.
            evaluation = dataclasses.replace(evaluation, protocol="sliding-window")
        probs = engine.predict(model, val.images[:n], evaluation, device=self.device)
        panel = overlay_panel(val.images[:n], val.masks[:n], probs.numpy(),
                              None if val.fov is None else val.fov[:n])
        self.tracker.log_image(run_id, panel, "overlays/best_epoch.png")
        self.tracker.set_tags(run_id, {"mapnet_tune.overlay_epoch": epoch})
        model.train()

    def _requeue(self, trial: optuna.Trial, why: str, params: dict[str, Any] | None = None,
                 ) -> None:
        """Queue the same sampled values (or ``params``) again, so the configuration is not
        lost."""
        trial.study.enqueue_trial(dict(params or trial.params),
                                  user_attrs={"retry_of": trial.number, "retry_reason": why})

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
        fits = (half in spec.choices if spec.kind == "categorical"
                else spec.kind in ("int", "float") and spec.low <= half)
        if half < 1 or not fits:
            return (f"not re-queued: half the batch ({half}) is outside the search space of "
                    f"batch_size")
        self._requeue(trial, "out of memory", {**trial.params, "batch_size": half})
        return f"re-queued with batch size {half}"


def _ensure_parent(study: optuna.Study, created: bool, tracker: Tracker, experiment_id: str,
                   req: SearchRequest) -> str:
    """The study's one parent run, created by the worker that created the study.

    Creating the study is atomic in the storage, so exactly one of several workers started
    together creates it; the others wait for its parent run id in the study's user
    attributes. Should that worker die first, each waiting worker creates a run, writes its
    id, waits and reads back: the last write wins everywhere and the losers delete theirs.
    """
    existing = study.user_attrs.get(PARENT_ATTR)
    waited = 0.0
    while not existing and not created and waited < PARENT_WAIT_S:
        time.sleep(0.5)
        waited += 0.5
        existing = study.user_attrs.get(PARENT_ATTR)
    if existing:
        tracker.reopen_run(existing)  # it was marked FINISHED when the study last completed
        return existing
    run_id = tracker.create_run(experiment_id, f"{req.study.dataset.name}-study", {
        "optuna.study": req.study_name, "mapnet_tune.role": "study", "git.sha": git_sha(),
        "optuna.storage": redact_url(req.storage)})
    study.set_user_attr(PARENT_ATTR, run_id)
    if not created:
        time.sleep(1.0)
    winner = study.user_attrs[PARENT_ATTR]
    if winner != run_id:
        tracker.delete_run(run_id)
        return winner
    tracker.log_params(run_id, {**req.study.fixed_settings(),
                                "search_space": _space_text(req.study)})
    return run_id


def _space_text(study: StudyConfig) -> str:
    parts = []
    for p in study.space:
        if p.kind == "categorical":
            parts.append(f"{p.name}={list(p.choices)}")
        elif p.kind in ("float", "int"):
            parts.append(f"{p.name}=[{p.low},{p.high}]{'log' if p.log else ''}")
    return "; ".join(parts)


def _open_study(req: SearchRequest, tracker: Tracker) -> tuple[optuna.Study, bool]:
    """The study, created if missing; True when this worker created it."""
    storage = open_storage(req.storage, heartbeat_s=req.heartbeat_s, grace_s=req.grace_s,
                           on_lost=LostTrialCallback(tracker, req.grace_s))
    where = {"storage": storage, "study_name": req.study_name, "sampler": _sampler(req.study),
             "pruner": _pruner(req.study)}
    try:
        study = optuna.create_study(direction=req.study.objective.direction, **where)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**where)
        created = False
    digest = study.user_attrs.get("config_digest")
    if digest is None:
        study.set_user_attr("config_digest", req.study.digest())
        study.set_user_attr("config_file", req.study.path)
        study.set_user_attr("dataset", req.study.dataset.name)
        study.set_user_attr("objective", req.study.objective.metric)
    elif digest != req.study.digest():
        raise UserError(
            f"study '{req.study_name}' in {redact_url(req.storage)} was created from different "
            f"settings than {req.study.path}; restore that file or pass --study NEW_NAME to start "
            f"a new study")
    return study, created


def enqueue_file(study: optuna.Study, path: Path) -> int:
    """Queue the parameters of an ``export-best`` YAML file first (a warm start).

    Returns:
        How many parameter sets were queued (already-queued ones are skipped).

    Raises:
        UserError: When the file is missing or not in the export format.
    """
    doc = read_yaml(path, "--enqueue file",
                    f"write one with `mapnet-tune export-best --out {path}`")
    entries = doc.get("trials") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("params"), dict) for e in entries):
        raise UserError(f"--enqueue file {path} must hold 'trials: [{{params: {{...}}}}]' as "
                        f"written by `mapnet-tune export-best`")
    for entry in entries:
        study.enqueue_trial(entry["params"], skip_if_exists=True)
    return len(entries)


def is_surplus(trial: FrozenTrial) -> bool:
    """A trial handed back unrun because the study was already full (see ``Objective``)."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(SURPLUS_ATTR))


def run_search(req: SearchRequest) -> optuna.Study:
    """Run trials until the study holds ``req.trials`` finished trials or the time is up.

    Safe to run in several processes, on one or many machines, on one study: each asks the
    storage for the next trial, and a worker whose trials are all done waits for the others
    (see :func:`_work`).

    Raises:
        UserError: For a bad study file, unreachable storage or tracking server, or bad data.
        KeyboardInterrupt: On Ctrl-C, after marking the running trial and re-queueing it.
    """
    tracker = Tracker(req.tracking_uri, tolerate_outages=True)
    tracker.check_reachable()
    # Data problems surface before anything is written to either store. Workers started
    # together prepare at the same time (the cache tolerates that), so none of them waits
    # long for the parent run that the study's creator makes right after.
    data = prepare(req.study.dataset.name, req.source or req.study.dataset.source,
                   req.study.dataset.options)
    check_channels(req.study, data.channels)
    study, created = _open_study(req, tracker)
    experiment_id = tracker.experiment(req.study_name)
    parent = _ensure_parent(study, created, tracker, experiment_id, req)
    if req.enqueue is not None:
        enqueue_file(study, req.enqueue)
    tracker.set_tags(parent, {"dataset.fingerprint": data.fingerprint})
    progress = Progress(study, req.trials, req.study.objective.metric)
    deadline = time.time() + req.timeout_s if req.timeout_s else None
    objective = Objective(req, data, tracker, experiment_id, parent, progress, deadline)
    try:
        with _sigterm_as_interrupt():
            _work(study, objective, tracker, progress, req, deadline)
        tracker.end_run(parent, "FINISHED")
    except UserError as exc:
        tracker.end_run(parent, "FAILED", str(exc))
        raise
    except StudyTimeout:
        progress.line("time limit reached; run the same command to continue")
        return study
    finally:
        left = tracker.flush_pending()
        if left:
            progress.line(f"MLflow runs {', '.join(left)} stay RUNNING: the tracking server "
                          f"did not come back before this worker stopped")
    progress.line("study complete")
    return study


def _work(study: optuna.Study, objective: Objective, tracker: Tracker, progress: Progress,
          req: SearchRequest, deadline: float | None) -> None:
    """Run trials until the study holds ``req.trials`` finished ones, across all workers.

    When the trials still needed are all running on other workers, wait instead of
    leaving: should one of those workers be lost, its trial is re-queued after the grace
    period and this worker runs it. While the tracking server is down, wait before
    starting a trial (the one running when it went down still finishes and reaches Optuna).
    """
    shown = ""
    while True:
        _fail_lost_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if finished >= req.trials:
            return
        _stop_after_repeated_failures(trials)
        if deadline is not None and time.time() > deadline:
            raise StudyTimeout
        outage = tracker.outage()
        if outage is not None:
            why = (f"MLflow tracking server unreachable ({outage}); the next trial starts when "
                   f"it is back")
        elif finished + running >= req.trials:
            why = (f"waiting for {running} trial(s) running on other workers (a lost worker's "
                   f"trial is re-queued {req.grace_s} s after its last heartbeat)")
        else:
            tracker.flush_pending()
            study.optimize(objective, n_trials=1, catch=(Exception,))
            shown = ""
            continue
        if why != shown:
            progress.line(why)
            shown = why
        time.sleep(min(POLL_S, req.heartbeat_s))


def _stop_after_repeated_failures(trials: list[FrozenTrial]) -> None:
    """Raise when the latest trials all failed and no queued retry is left to try.

    Raises:
        UserError: Naming the count and the last failure's reason.
    """
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        return
    streak = []
    for trial in sorted(trials, key=lambda t: t.number, reverse=True):
        if is_surplus(trial):
            continue
        if trial.state != TrialState.FAIL:
            break
        streak.append(trial)
    if len(streak) >= MAX_CONSECUTIVE_FAILURES:
        last = streak[0]
        reason = last.user_attrs.get("fail_reason", "no reason recorded")
        raise UserError(f"the last {len(streak)} trials failed, the latest (t{last.number:04d}) "
                        f"with {reason}; fix the cause and run the same command to resume")


def _fail_lost_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Stop on SIGTERM (``docker stop``, the ``--gpus`` launcher) as on Ctrl-C.

    The running trial is then marked and re-queued instead of waiting out the grace period.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The completed trials, best first by the study's direction."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(trials, key=lambda t: t.value, reverse=maximize)


def trials_table(study: optuna.Study, top: int = 10) -> str:
    """A Markdown table of the best finished trials with parameters and metrics."""
    trials = ranked_trials(study)
    metric = study.user_attrs.get("objective", "value")
    names = sorted({k for t in trials for k in t.params})
    extra = ["val/f1", "val/auc", "val/accuracy"]
    head = ["trial", metric, *extra, "epoch", *names, "mlflow run"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials[:top]:
        m = t.user_attrs.get("metrics", {})
        cells = [f"t{t.number:04d}", f"{t.value:.4f}",
                 *(f"{m[k]:.4f}" if k in m else "-" for k in extra),
                 str(t.user_attrs.get("best_epoch", -1) + 1),
                 *(_fmt(t.params.get(k)) for k in names), t.user_attrs.get("mlflow_run_id", "-")]
        rows.append("| " + " | ".join(cells) + " |")
    kept = [t for t in study.get_trials(deepcopy=False) if not is_surplus(t)]
    counts = {s.name.lower(): sum(t.state == s for t in kept)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                        TrialState.RUNNING, TrialState.WAITING)}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"study {study.study_name}: {summary}\n\n" + "\n".join(rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def export_best(study: optuna.Study, top: int = 1) -> str:
    """YAML with the best trials' parameters, readable by ``search --enqueue``."""
    trials = ranked_trials(study)
    if not trials:
        raise UserError(f"study '{study.study_name}' has no completed trial yet; run "
                        f"`mapnet-tune search` until one completes")
    doc = {"study": study.study_name, "objective": study.user_attrs.get("objective"),
           "trials": [{"trial": t.number, "value": float(t.value), "params": dict(t.params)}
                      for t in trials[:top]]}
    return yaml.safe_dump(doc, sort_keys=False)


def params_for_log(params: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled parameters with the ``hp.`` prefix used in MLflow."""
    return {f"hp.{k}": v for k, v in params.items()}
