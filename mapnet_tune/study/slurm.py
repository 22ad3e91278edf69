"""Workers as a SLURM job array, or as local processes, submitted through submitit.

``search --executor slurm --workers N`` submits one job array of N tasks. Each task runs the
worker loop of ``mapnet-tune search`` (:func:`~mapnet_tune.study.worker.run_search`) on the
same study, so the study-wide trial count, heartbeats and lost-trial retry work exactly as
for workers started by hand. The command returns once the array is queued, or with
``--wait`` follows the study until it completes. ``--executor local`` runs the same
submission with submitit's LocalExecutor (one process per worker on this machine), for tests
and laptops.

Secrets stay out of the job files: the storage URL and the tracking URI reach the tasks in
their environment (sbatch passes the submitting environment on, as LocalExecutor does), not
in the pickled request, the sbatch script or a command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import optuna
import submitit
from submitit.core.utils import FailedJobError

from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.settings import STORAGE_ENV, TRACKING_ENV, resolve_tracking_uri
from mapnet_tune.storage import (
    FINISHED,
    JOURNAL_SCHEME,
    finished_here,
    journal_path,
    open_storage,
)
from mapnet_tune.study.launcher import check_shared_stores
from mapnet_tune.study.progress import Progress
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.study.submission import Submission
from mapnet_tune.study.task import WorkerTask, existing_study
from mapnet_tune.tracking import Tracker

#: How long before the time limit SLURM warns a task with SIGUSR1: time to re-queue the
#: running trial and end its MLflow run (SLURM may send it up to a minute early).
SIGNAL_DELAY_S = 120
#: Local workers have no time limit unless --slurm-time gives one.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
#: Seconds between two looks at the study while following it.
POLL_S = 5


def submit_search(req: SearchRequest, sub: Submission) -> optuna.Study | None:
    """Submit the workers of ``req``; with ``sub.wait``, follow the study until it completes.

    Returns:
        The completed study with ``sub.wait``, else None once the workers are submitted.

    Raises:
        UserError: Before submitting, when a store is SQLite or unreachable, or sbatch
            refuses the job; while following, when every worker stopped short of the total.
    """
    check_shared_stores(req, f"--executor {sub.executor}")
    req = _absolute_journal(req)
    Tracker(req.tracking_uri).check_reachable()
    open_storage(req.storage, heartbeat=False)
    tracking_uri = resolve_tracking_uri(req.tracking_uri)
    tasks = [WorkerTask(_shareable(req, first=i == 0), sub.requeue) for i in range(sub.workers)]
    executor = _executor(sub, req.study_name)
    env = {STORAGE_ENV: req.storage, TRACKING_ENV: tracking_uri, **_thread_share(sub)}
    local_log = Path(executor.folder) / "local-workers.log" if sub.executor == "local" else None
    try:
        # submitit prints sbatch's complaint as well as raising it; the error says it once.
        with _submitting(env, local_log), contextlib.redirect_stderr(io.StringIO()):
            jobs = executor.submit_array(tasks)
    except FailedJobError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no reason given"
        raise UserError(
            f"sbatch refused the job array ({reason}); check --slurm-partition, "
            f"--slurm-time, --slurm-gpus-per-worker and --slurm-option"
        ) from None
    folder = jobs[0].paths.folder
    print(_submitted(req, sub, jobs, folder, tracking_uri), flush=True)
    if not sub.wait:
        return None
    return follow(req, _liveness(sub, jobs), len(jobs), folder)


def follow(
    req: SearchRequest, alive: Callable[[], bool], workers: int, folder: Path
) -> optuna.Study:
    """Print the study's progress until it holds ``req.trials`` finished trials.

    Ctrl-C stops following only: the workers keep running.

    Args:
        req: The search, for its storage, study name and total.
        alive: Whether any worker is still queued or running.
        workers: How many were submitted, for the messages.
        folder: Where their logs are.

    Raises:
        UserError: When every worker stopped before the study completed.
        SystemExit: With status 130 on Ctrl-C.
    """
    storage = open_storage(req.storage, heartbeat=False)
    progress, shown = None, None
    try:
        while True:
            running = alive()
            study = existing_study(storage, req.study_name)
            trials = [] if study is None else study.get_trials(deepcopy=False)
            if finished_here(trials) >= req.trials:
                return study
            if not running:
                raise UserError(
                    f"all {workers} workers stopped before study '{req.study_name}' reached "
                    f"{req.trials} finished trials; read their logs in {folder}, then run "
                    f"the same command to continue"
                )
            states = [t.state for t in trials]
            now = [states.count(s) for s in (*FINISHED, optuna.trial.TrialState.RUNNING)]
            if study is not None and now != shown:
                progress = progress or Progress(study, req.trials, req.study.objective.metric)
                progress.line(f"{now[-1]} trial(s) running; following the study (Ctrl-C stops)")
                shown = now
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        print(
            f"stopped following; the workers keep running (see {folder}); "
            f"mapnet-tune status --study {req.study_name} shows the study",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def _absolute_journal(req: SearchRequest) -> SearchRequest:
    """A relative journal path made absolute, so that tasks find it wherever they start."""
    path = journal_path(req.storage)
    if path is None or path.is_absolute():
        return req
    return dataclasses.replace(req, storage=f"{JOURNAL_SCHEME}{path.resolve()}")


def _shareable(req: SearchRequest, first: bool) -> SearchRequest:
    """The request as a task gets it: no secret, and paths that do not depend on its cwd.

    One task queues the --enqueue file; the others find its entries in the storage.
    """
    return dataclasses.replace(
        req,
        storage=redact_url(req.storage),
        tracking_uri=None,
        enqueue=req.enqueue.resolve() if first and req.enqueue is not None else None,
        source=None if req.source is None else str(Path(req.source).resolve()),
    )


def _executor(sub: Submission, study_name: str) -> submitit.Executor:
    """submitit's executor with the resources and signals of ``sub``."""
    delay = SIGNAL_DELAY_S if sub.time_s is None else min(SIGNAL_DELAY_S, sub.time_s // 2)
    if sub.executor == "local":
        # LocalExecutor's controller creates its folder as given, placeholder and all.
        folder = sub.folder.replace("%A", f"local-{int(time.time())}").replace("%j", "")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=0)
        executor.update_parameters(
            timeout_min=LOCAL_TIMEOUT_MIN if sub.time_s is None else sub.time_s / 60,
            signal_delay_s=delay,
            gpus_per_node=sub.gpus_per_worker or 0,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=sub.folder, max_num_timeout=0)
    extra: dict[str, object] = {"signal": f"USR1@{delay}"}
    if sub.requeue:
        extra["requeue"] = True
    executor.update_parameters(
        job_name=f"mapnet-{study_name}",
        # None leaves the partition's default time limit.
        time=None if sub.time_s is None else math.ceil(sub.time_s / 60),
        partition=sub.partition,
        gpus_per_node=sub.gpus_per_worker,
        array_parallelism=sub.workers,
        additional_parameters={**extra, **sub.options},
    )
    return executor


def _thread_share(sub: Submission) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for local workers that train on this machine's CPUs.

    Each PyTorch process otherwise starts a thread per core; two workers on two cores then
    wait on each other's spinning threads, and a small study took seven times as long
    (docs/benchmarks.md, "Search workers sharing one CPU"). A value the user exported wins;
    SLURM tasks get their CPUs from the scheduler (docs/deploy.md), and GPU workers barely
    use theirs.
    """
    if sub.executor != "local" or sub.gpus_per_worker or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // sub.workers))}


@contextlib.contextmanager
def _submitting(env: Mapping[str, str], local_log: Path | None) -> Iterator[None]:
    """The environment the workers inherit while they are submitted.

    Local workers (``local_log`` given), like SLURM jobs, outlive this command: they start
    with SIGINT ignored, so that Ctrl-C here does not reach them (SIGTERM, ``kill``, stops
    them, each re-queueing its trial), and with stdout and stderr on ``local_log``, so that
    a pipe from this command (``| tee``) does not stay open until they end.
    """
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    with contextlib.ExitStack() as stack:
        if local_log is not None:
            stack.enter_context(_inherited_output(local_log))
            if threading.current_thread() is threading.main_thread():
                sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
                stack.callback(signal.signal, signal.SIGINT, sigint)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _inherited_output(path: Path) -> Iterator[None]:
    """File descriptors 1 and 2 on ``path`` for the processes started meanwhile.

    submitit's LocalExecutor starts its controllers with this process's own stdout and
    stderr; they print nothing but a crash of their own.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _liveness(sub: Submission, jobs: Sequence[submitit.Job]) -> Callable[[], bool]:
    """Whether any worker is still queued or running."""
    if sub.executor == "local":
        return lambda: any(not job.done() for job in jobs)
    # submitit asks sacct, which needs SLURM's accounting database; squeue does not.
    array = jobs[0].job_id.split("_")[0]

    def alive() -> bool:
        done = subprocess.run(
            ["squeue", "--noheader", "--jobs", array, "--format", "%T"],
            capture_output=True,
            text=True,
        )
        # An error (a busy controller) is not proof that the workers are gone.
        return done.returncode != 0 or bool(done.stdout.strip())

    return alive


def _submitted(
    req: SearchRequest,
    sub: Submission,
    jobs: Sequence[submitit.Job],
    folder: Path,
    tracking_uri: str,
) -> str:
    """What was submitted, and how to follow and stop it."""
    ids = [job.job_id for job in jobs]
    if sub.executor == "slurm":
        array = ids[0].split("_")[0]
        what = f"SLURM job array {array} (tasks {', '.join(ids)})"
        stop = f"scancel {array}"
    else:
        what = f"local processes {', '.join(ids)}"
        stop = f"kill {' '.join(ids)}"
    storage = redact_url(req.storage)
    follow_with = f"mapnet-tune status --study {req.study_name}"
    follow_with += f" --storage {storage}" if storage == req.storage else " (same --storage)"
    return "\n".join(
        [
            f"submitted {len(jobs)} workers for study '{req.study_name}' "
            f"({req.trials} trials in all) as {what}",
            f"  logs:   {folder}",
            f"  follow: {follow_with}",
            f"  MLflow: experiment '{req.study_name}' at {redact_url(tracking_uri)}",
            f"  stop:   {stop} (each worker queues its running trial again)",
        ]
    )
