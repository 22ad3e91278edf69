"""What one scheduler task runs: the worker loop, stopped cleanly by the scheduler's signals.

SLURM sends SIGTERM before it kills a task (``scancel``, preemption) and, as submitted,
SIGUSR1 shortly before the time limit. Either makes the worker mark its running trial and
queue its parameters again, as Ctrl-C does; near the time limit, with ``--slurm-requeue``,
the task then puts itself back in the queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import submitit

from mapnet_tune.errors import UserError
from mapnet_tune.settings import STORAGE_ENV, TRACKING_ENV
from mapnet_tune.storage import finished_here, open_storage
from mapnet_tune.study.request import SearchRequest

#: The time-limit warnings: SIGUSR1, which we ask sbatch for, and SIGUSR2, which submitit's
#: LocalExecutor sends (and sbatch too, if a user asks for submitit's default).
TIME_LIMIT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class _Stop(KeyboardInterrupt):
    """A signal asked the task to stop. Like Ctrl-C, it makes the objective mark the running
    trial and queue its parameters again."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class WorkerTask:
    """One array task: the worker loop of ``mapnet-tune search`` on the shared study.

    submitit pickles it into the job folder, so it holds no secret: the storage URL and the
    tracking URI come from the task's environment.

    Attributes:
        req: The search, with the storage URL masked and no tracking URI.
        requeue: Put the task back in the queue when it stops at its time limit.
    """

    req: SearchRequest
    requeue: bool = False

    def __call__(self) -> str:
        """Run the worker; returns how it ended (submitit keeps it with the job).

        Raises:
            SystemExit: With status 2 after a mistake the user can fix (its one line is on
                stderr), or once the task is requeued.
        """
        from mapnet_tune.study.worker import run_search

        req, before = self.req, None
        with _stop_on(signal.SIGTERM, *TIME_LIMIT_SIGNALS):
            try:
                req = self._with_stores()
                before = _finished(req)
                study = run_search(req)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            except KeyboardInterrupt as exc:
                # The worker loop's own SIGTERM handler raises a plain KeyboardInterrupt.
                return self._stopped(req, getattr(exc, "signum", signal.SIGTERM), before)
        done = finished_here(study.get_trials(deepcopy=False))
        return "study complete" if done >= req.trials else "stopped at --timeout"

    def _with_stores(self) -> SearchRequest:
        missing = [name for name in (STORAGE_ENV, TRACKING_ENV) if not os.environ.get(name)]
        if missing:
            raise UserError(
                f"{' and '.join(missing)} not set in this task's environment, so it cannot "
                f"find the study; sbatch passes on the submitting environment unless told "
                f"otherwise: drop --slurm-option export=... or unset SBATCH_EXPORT"
            )
        return dataclasses.replace(
            self.req, storage=os.environ[STORAGE_ENV], tracking_uri=os.environ[TRACKING_ENV]
        )

    def _stopped(self, req: SearchRequest, signum: int, before: int | None) -> str:
        """Say why the task stopped; requeue it when its time limit is near and it may.

        A task is requeued only when the study gained a finished trial while it ran (before
        that, ``before`` finished trials): with a time limit shorter than a trial, requeueing
        would go on forever.
        """
        name = signal.Signals(signum).name
        if signum not in TIME_LIMIT_SIGNALS:
            return _say(f"stopped by {name}; the running trial, if any, is queued again")
        if not self.requeue:
            return _say(
                f"stopped by {name} before the time limit; the running trial is queued again; "
                f"submit again (or with --slurm-requeue) to continue"
            )
        if before is None or _finished(req) <= before:
            return _say(
                f"stopped by {name} before the time limit and not requeued: no trial finished "
                f"while this task ran; raise --slurm-time"
            )
        _say(f"stopped by {name} before the time limit; requeueing this task")
        # Requeueing ends this task with SIGTERM; its trial is queued and its run ended.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        submitit.JobEnvironment()._requeue(countdown=0)
        # Exit without a result, so that submitit does not take the task for finished.
        raise SystemExit(0)


def _say(text: str) -> str:
    print(text, file=sys.stderr, flush=True)
    return text


@contextlib.contextmanager
def _stop_on(*signums: int) -> Iterator[None]:
    """Raise :class:`_Stop` in the main thread on these signals.

    submitit handles them first in a job process: it ignores SIGTERM, and on SIGUSR2 it
    requeues the job and exits at once, which would leave the running trial RUNNING until its
    heartbeat's grace period ran out. Installed after submitit's, these handlers win.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise _Stop(signum)

    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _finished(req: SearchRequest) -> int:
    """How many finished trials the study holds (0 before a worker created it)."""
    study = existing_study(open_storage(req.storage, heartbeat=False), req.study_name)
    return 0 if study is None else finished_here(study.get_trials(deepcopy=False))


def existing_study(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    """The study ``name``, or None before a worker created it."""
    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)
