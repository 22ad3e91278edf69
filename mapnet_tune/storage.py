"""The Optuna storage that search and retrain-best share: open it, load a study, rank its
finished trials.

Both stages read studies through this module, so that retrain-best needs nothing from the
search's worker code.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.settings import resolve_storage

#: Trials that are done: complete, or stopped early by the pruner.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Defaults of ``--heartbeat-interval`` and ``--grace-period``: a running trial records a
#: heartbeat this often, and one silent for the grace period counts as lost (worker killed,
#: machine gone), is marked failed and re-queued.
HEARTBEAT_S = 30
GRACE_S = 90
#: How often a lost trial is re-queued before its parameters are given up.
LOST_RETRIES = 2
#: User attribute of a trial handed back unrun because the study was already full.
SURPLUS_ATTR = "surplus"
# Workers starting together on a new database race to create Optuna's tables; the losers
# find them created on a later try.
_SCHEMA_TRIES = 3


def open_storage(
    url: str,
    heartbeat: bool = True,
    *,
    heartbeat_s: int = HEARTBEAT_S,
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
                raise UserError(
                    f"--grace-period ({grace_s} s) must be longer than "
                    f"--heartbeat-interval ({heartbeat_s} s), or live trials would "
                    f"count as lost"
                )
            kwargs.update(
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=on_lost or retry_lost(),
            )
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
    return UserError(
        f"Optuna storage {redact_url(url)} cannot be opened ({first}); check the "
        f"URL (e.g. postgresql+psycopg2://user@host/db) and that the database "
        f"is running, or pass --storage / set MAPNET_TUNE_STORAGE"
    )


def retry_lost() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that re-queues a lost trial, up to ``LOST_RETRIES`` times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=LOST_RETRIES)


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
        raise UserError(
            f"{redact_url(url)} holds {len(names)} studies; pass --study NAME with one "
            f"of: {', '.join(sorted(names)) or '(none: run mapnet-tune search first)'}"
        )
    if name not in names:
        raise UserError(
            f"no study '{name}' in {redact_url(url)}; existing studies: "
            f"{', '.join(sorted(names)) or '(none)'}; pass --study NAME or --storage"
        )
    return optuna.load_study(study_name=name, storage=store)


def is_surplus(trial: FrozenTrial) -> bool:
    """A trial handed back unrun because the study was already full (see ``claim_slot``)."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(SURPLUS_ATTR))


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The completed trials, best first by the study's direction."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None
    ]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(trials, key=lambda t: t.value, reverse=maximize)
