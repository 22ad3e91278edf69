"""Crash recovery and exact trial counts across workers: lost trials are failed and
re-queued, and a trial started after the study is full is handed back unrun.
"""

from __future__ import annotations

import sys
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.names import RUN_ID_ATTR, trial_tag
from mapnet_tune.storage import LOST_RETRIES, SURPLUS_ATTR, is_warm_start, retry_lost
from mapnet_tune.tracking import Tracker

#: Trials that count towards ``--trials``: finished ones and those running right now (so two
#: workers do not both start the last trial). Failed trials do not count: they are retried;
#: nor do trials copied by a warm start.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class SurplusTrial(Exception):
    """Lower-numbered trials already fill the study, so this one is handed back unrun."""


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
    ahead = sum(
        t.number < trial.number and t.state in COUNTED and not is_warm_start(t) for t in trials
    )
    if ahead < target:
        return
    own = next(t for t in trials if t.number == trial.number)
    queued = {**own.system_attrs.get("fixed_params", {}), **own.params}
    if queued:
        trial.study.enqueue_trial(
            queued, user_attrs={k: v for k, v in own.user_attrs.items() if k != RUN_ID_ATTR}
        )
    trial.set_user_attr(SURPLUS_ATTR, True)
    raise SurplusTrial(f"{ahead} lower-numbered trials already reach --trials")


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
        self.retry = retry_lost()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Re-queue ``trial`` (up to ``LOST_RETRIES`` times) and end its run as FAILED."""
        requeued = len(trial.system_attrs.get("retry_history", [])) < LOST_RETRIES
        self.retry(study, trial)
        why = (
            f"worker lost: no heartbeat for {self.grace_s} s; "
            f"{'re-queued' if requeued else f'not re-queued after {LOST_RETRIES} retries'}"
        )
        print(f"{trial_tag(trial.number)} FAILED: {why}", file=sys.stderr, flush=True)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id:
            return
        try:
            self.tracker.end_run(run_id, "FAILED", why)
        except Exception as exc:  # an old run must not stop a live worker
            print(
                f"warning: could not mark MLflow run {run_id} FAILED: {exc}",
                file=sys.stderr,
                flush=True,
            )


def fail_lost_trials(study: optuna.Study) -> None:
    """Fail the trials whose heartbeat stopped; the storage's callback then re-queues them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
