"""The work loop of one ``mapnet-tune search`` worker.

Any number of workers, on one machine or many, share one study through the Optuna storage
and one MLflow tracking server; the storage hands out trials one by one and there is no
scheduler of our own. The worker that creates the study also creates its one parent run.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.config import StudyConfig, check_channels, read_yaml
from mapnet_tune.data import prepare
from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.names import (
    DATASET_TAG,
    FINGERPRINT_TAG,
    GIT_TAG,
    PARENT_ATTR,
    ROLE_TAG,
    SEARCH_SOURCE,
    STORAGE_TAG,
    STUDY_BEST_METRIC,
    STUDY_TAG,
    TRIAL_COUNT_METRICS,
    summary_key,
    trial_tag,
)
from mapnet_tune.storage import finished_here, is_surplus, open_storage
from mapnet_tune.study.objective import Objective
from mapnet_tune.study.progress import Progress
from mapnet_tune.study.recovery import LostTrialCallback, fail_lost_trials
from mapnet_tune.study.request import SearchRequest, StudyTimeout
from mapnet_tune.study.sampling import make_pruner, make_sampler
from mapnet_tune.study.story import StudyStory
from mapnet_tune.study.warmstart import (
    FIXED_PARAMS_ATTR,
    check_warm_started,
    copy_trials,
    link_runs,
    open_source,
)
from mapnet_tune.tracking import Tracker, git_sha
from mapnet_tune.tracking.links import study_view

#: A study stops when its most recent trials all failed this many times in a row: the cause
#: (a bug, a broken dataset, a batch that never fits) will not go away by sampling more.
MAX_CONSECUTIVE_FAILURES = 5


#: Longest pause between two looks at the study while a worker waits for others.
POLL_S = 5


#: How long a worker that did not create the study waits for its creator's parent run.
PARENT_WAIT_S = 60

# Optuna logs a full traceback for every failed trial; we print one line per failure
# ourselves and keep the traceback in the trial's user attributes.
optuna.logging.set_verbosity(optuna.logging.ERROR)


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
    data = prepare(
        req.study.dataset.name, req.source or req.study.dataset.source, req.study.dataset.options
    )
    check_channels(req.study, data.channels)
    source = open_source(req) if req.warm_start else None
    study, created = _open_study(req, tracker)
    # Copied before the parent run exists: other workers wait for it, so they find the copies.
    warm = copy_trials(study, source, req) if source is not None and created else None
    experiment_id = tracker.experiment(req.study_name, {DATASET_TAG: data.name})
    parent = _ensure_parent(study, created, tracker, experiment_id, req)
    if warm is not None:
        link_runs(tracker, experiment_id, parent, warm, req.study, req.study_name)
    elif req.warm_start:
        check_warm_started(study, req)
    if req.enqueue is not None:
        enqueue_file(study, req.enqueue)
    tracker.set_tags(parent, {FINGERPRINT_TAG: data.fingerprint})
    tracker.log_dataset(parent, data.name, data.fingerprint, data.source, "search")
    tracker.show_study(experiment_id, _runs_view(req.study))
    progress = Progress(study, req.trials, req.study.objective.metric)
    if warm is not None:
        progress.line(warm.line())
    deadline = time.time() + req.timeout_s if req.timeout_s else None
    objective = Objective(req, data, tracker, experiment_id, parent, progress, deadline)
    progress.device(objective.device)
    story = StudyStory(tracker, experiment_id, parent, req.trials)
    try:
        with _sigterm_as_interrupt():
            _work(study, objective, tracker, progress, req, deadline, story)
        story.finish(study)
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
            progress.line(
                f"MLflow runs {', '.join(left)} stay RUNNING: the tracking server "
                f"did not come back before this worker stopped"
            )
    progress.line("study complete")
    return study


def _work(
    study: optuna.Study,
    objective: Objective,
    tracker: Tracker,
    progress: Progress,
    req: SearchRequest,
    deadline: float | None,
    story: StudyStory,
) -> None:
    """Run trials until the study holds ``req.trials`` finished ones, across all workers.

    When the trials still needed are all running on other workers, wait instead of
    leaving: should one of those workers be lost, its trial is re-queued after the grace
    period and this worker runs it. While the tracking server is down, wait before
    starting a trial (the one running when it went down still finishes and reaches Optuna).
    """
    shown = ""
    while True:
        fail_lost_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = finished_here(trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if finished >= req.trials:
            return
        _stop_after_repeated_failures(trials)
        if deadline is not None and time.time() > deadline:
            raise StudyTimeout
        outage = tracker.outage()
        if outage is not None:
            why = (
                f"MLflow tracking server unreachable ({outage}); the next trial starts when "
                f"it is back"
            )
        elif finished + running >= req.trials:
            why = (
                f"waiting for {running} trial(s) running on other workers (a lost worker's "
                f"trial is re-queued {req.grace_s} s after its last heartbeat)"
            )
        else:
            tracker.flush_pending()
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[story])
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
        raise UserError(
            f"the last {len(streak)} trials failed, the latest ({trial_tag(last.number)}) "
            f"with {reason}; fix the cause and run the same command to resume"
        )


def _open_study(req: SearchRequest, tracker: Tracker) -> tuple[optuna.Study, bool]:
    """The study, created if missing; True when this worker created it."""
    storage = open_storage(
        req.storage,
        heartbeat_s=req.heartbeat_s,
        grace_s=req.grace_s,
        on_lost=LostTrialCallback(tracker, req.grace_s),
    )
    where = {
        "storage": storage,
        "study_name": req.study_name,
        "sampler": make_sampler(req.study),
        "pruner": make_pruner(req.study),
    }
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
        study.set_user_attr(
            FIXED_PARAMS_ATTR, {p.name: p.value for p in req.study.space if not p.searched}
        )
    elif digest != req.study.digest():
        raise UserError(
            f"study '{req.study_name}' in {redact_url(req.storage)} was created from different "
            f"settings than {req.study.path}; restore that file or pass --study NEW_NAME to start "
            f"a new study"
        )
    # Optuna's dashboard and plots name the objective by this instead of "Objective 0"; set
    # on resume too, for studies created before it was.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names is None:
            study.set_metric_names([req.study.objective.metric])
    return study, created


def _ensure_parent(
    study: optuna.Study, created: bool, tracker: Tracker, experiment_id: str, req: SearchRequest
) -> str:
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
    run_id = tracker.create_run(
        experiment_id,
        f"{req.study.dataset.name}-study",
        {
            STUDY_TAG: req.study_name,
            ROLE_TAG: "study",
            GIT_TAG: git_sha(),
            STORAGE_TAG: redact_url(req.storage),
        },
        source=SEARCH_SOURCE,
    )
    study.set_user_attr(PARENT_ATTR, run_id)
    if not created:
        time.sleep(1.0)
    winner = study.user_attrs[PARENT_ATTR]
    if winner != run_id:
        tracker.delete_run(run_id)
        return winner
    tracker.log_params(
        run_id, {**req.study.fixed_settings(), "search_space": _space_text(req.study)}
    )
    return run_id


def _runs_view(study: StudyConfig) -> str:
    """The study's runs page: trials by their best objective, with what tells them apart.

    Few metric columns, so that the objective's fits on a laptop's screen next to the
    Dataset and Source columns; the table orders metric columns by name.
    """
    metric = summary_key(study.objective.metric, "best")
    return study_view(
        metric,
        study.objective.direction == "maximize",
        [metric, summary_key("val/f1", "best"), STUDY_BEST_METRIC, TRIAL_COUNT_METRICS["complete"]],
        [f"hp.{p.name}" for p in study.space if p.searched],
    )


def _space_text(study: StudyConfig) -> str:
    parts = []
    for p in study.space:
        if p.kind == "categorical":
            parts.append(f"{p.name}={list(p.choices)}")
        elif p.kind in ("float", "int"):
            parts.append(f"{p.name}=[{p.low},{p.high}]{'log' if p.log else ''}")
    return "; ".join(parts)


def enqueue_file(study: optuna.Study, path: Path) -> int:
    """Queue the parameters of an ``export-best`` YAML file first (a warm start).

    Returns:
        How many parameter sets were queued (already-queued ones are skipped).

    Raises:
        UserError: When the file is missing or not in the export format.
    """
    doc = read_yaml(
        path, "--enqueue file", f"write one with `mapnet-tune export-best --out {path}`"
    )
    entries = doc.get("trials") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("params"), dict) for e in entries
    ):
        raise UserError(
            f"--enqueue file {path} must hold 'trials: [{{params: {{...}}}}]' as "
            f"written by `mapnet-tune export-best`"
        )
    for entry in entries:
        study.enqueue_trial(entry["params"], skip_if_exists=True)
    return len(entries)


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
