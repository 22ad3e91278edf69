"""The Optuna storage that search and retrain-best share: open it, load a study, rank its
finished trials.

Both stages read studies through this module, so that retrain-best needs nothing from the
search's worker code. A storage is an SQLAlchemy URL (PostgreSQL for shared studies) or a
journal file, ``journal:///relative/study.log`` or ``journal:////absolute/study.log``.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError

# Not exported by optuna.storages, but it is what fail_stale_trials and Study.optimize look for.
from optuna.storages._heartbeat import BaseHeartbeat

# Optuna has no public reader of a trial's last heartbeat; its RDB schema holds it.
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend, JournalStorage
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
#: User attribute of a trial copied from another study by ``search --warm-start``: where it
#: ran (``{"study": NAME, "trial": NUMBER}``). Its result informs the sampler, but it was not
#: run in this study, so it neither counts toward ``--trials`` nor competes for best trial.
WARM_START_ATTR = "warm_start"
# Workers starting together on a new database race to create Optuna's tables; the losers
# find them created on a later try.
_SCHEMA_TRIES = 3
#: The scheme of a journal-file storage. As in SQLAlchemy's ``sqlite:///`` URLs, what follows
#: the three slashes is the path: relative to the working directory, or absolute when it
#: starts with a fourth slash.
JOURNAL_SCHEME = "journal:///"
#: Trial system attribute that a running trial's worker rewrites in a journal file as its
#: heartbeat (Optuna's JournalStorage has none).
HEARTBEAT_ATTR = "mapnet_tune:heartbeat"


def open_storage(
    url: str,
    heartbeat: bool = True,
    *,
    heartbeat_s: int = HEARTBEAT_S,
    grace_s: int = GRACE_S,
    on_lost: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    must_exist: bool = False,
) -> optuna.storages.BaseStorage:
    """A storage with heartbeats, so that a lost worker's trial is failed and retried.

    Args:
        url: An SQLAlchemy URL, or a journal file (``journal:///PATH``, see
            :func:`journal_path`).
        heartbeat: Record heartbeats of running trials; off for commands that only read.
        heartbeat_s: Seconds between two heartbeats of a running trial.
        grace_s: Seconds without a heartbeat after which a running trial counts as lost.
        on_lost: Called by whichever worker finds a lost trial, once it is marked failed;
            by default the trial is re-queued.
        must_exist: Refuse a journal file that does not exist yet (commands that read a
            study), instead of creating it.

    Raises:
        UserError: When the database cannot be reached, the journal file cannot be opened,
            or the grace period is too short.
    """
    if heartbeat and grace_s <= heartbeat_s:
        raise UserError(
            f"--grace-period ({grace_s} s) must be longer than "
            f"--heartbeat-interval ({heartbeat_s} s), or live trials would "
            f"count as lost"
        )
    journal = journal_path(url)
    if journal is not None:
        backend = _journal_file(journal, must_exist)
        if not heartbeat:
            return JournalStorage(backend)
        return HeartbeatJournalStorage(backend, heartbeat_s, grace_s, on_lost or retry_lost())
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


def journal_path(url: str) -> Path | None:
    """The file of a journal storage URL; None for any other URL.

    ``journal:///study.log`` is relative to the working directory and
    ``journal:////shared/study.log`` absolute, as in SQLAlchemy's ``sqlite:///`` URLs.

    Raises:
        UserError: For a ``journal:`` URL without a path after three slashes.
    """
    if not url.startswith("journal:"):
        return None
    path = url.removeprefix(JOURNAL_SCHEME)
    if path == url or not path.strip("/"):
        raise UserError(
            f"--storage {url} names no journal file; use {JOURNAL_SCHEME}study.log (relative "
            f"to the working directory) or {JOURNAL_SCHEME}/shared/path/study.log (absolute)"
        )
    return Path(path)


def _journal_file(path: Path, must_exist: bool) -> JournalFileBackend:
    """The journal file, created if missing unless ``must_exist``; its lock file sits beside it.

    Raises:
        UserError: When it is missing and must exist, or cannot be opened.
    """
    if must_exist and not path.is_file():
        raise UserError(
            f"Optuna journal {path} does not exist; check --storage or MAPNET_TUNE_STORAGE "
            f"({JOURNAL_SCHEME}relative/path or {JOURNAL_SCHEME}/absolute/path), or run "
            f"mapnet-tune search first"
        )
    try:
        return JournalFileBackend(str(path))
    except OSError as exc:
        raise UserError(
            f"Optuna journal {path} cannot be opened ({exc.strerror or exc}); create its "
            f"folder, or pass --storage {JOURNAL_SCHEME}PATH with a folder this user can write"
        ) from None


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal-file storage with the heartbeats that Optuna gives only RDB storages.

    A running trial's worker appends a heartbeat record (the trial's ``HEARTBEAT_ATTR``) every
    ``heartbeat_s`` seconds. A trial is stale once a worker watching the study has seen no new
    heartbeat of it for ``grace_s`` seconds of its own clock, so the machines' clocks need not
    agree; a worker that has just started therefore watches for one grace period before it
    can call a trial lost. Optuna's ``fail_stale_trials`` then fails it and ``on_lost``
    re-queues it, exactly as with PostgreSQL.

    Args:
        backend: The journal file.
        heartbeat_s: Seconds between two heartbeats of a running trial.
        grace_s: Seconds without a new heartbeat after which a running trial counts as lost.
        on_lost: Called with each trial this worker failed as stale.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_s: int,
        grace_s: int,
        on_lost: Callable[[optuna.Study, FrozenTrial], None],
    ) -> None:
        super().__init__(backend)
        self._heartbeat_s, self._grace_s, self._on_lost = heartbeat_s, grace_s, on_lost
        # trial id -> (the last heartbeat seen, when this worker first saw it)
        self._seen: dict[int, tuple[Any, float]] = {}

    def record_heartbeat(self, trial_id: int) -> None:
        """Append a heartbeat of a running trial to the journal."""
        # Another worker may have failed it as lost; the objective finds out on its next write.
        with contextlib.suppress(UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.monotonic()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            seen = self._seen.get(trial._trial_id)
            if seen is None or seen[0] != beat:
                self._seen[trial._trial_id] = (beat, now)
            elif now - seen[1] > self._grace_s:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        """Seconds between two heartbeats of a running trial."""
        return self._heartbeat_s

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None]:
        """What is done with a trial once it is failed as stale."""
        return self._on_lost


def retry_lost() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that re-queues a lost trial, up to ``LOST_RETRIES`` times."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=LOST_RETRIES)


def load_existing_study(
    storage: str | None, name: str | None, options: str = "--study NAME or --storage"
) -> optuna.Study:
    """A study that must already exist; with no name, the storage's only study.

    Args:
        storage: The storage URL (None: the default).
        name: The study (None: the only one in the storage).
        options: The command's options that name the study and storage, for the message.

    Raises:
        UserError: Listing the studies that do exist.
    """
    url = resolve_storage(storage)
    store = open_storage(url, heartbeat=False, must_exist=True)
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
            f"{', '.join(sorted(names)) or '(none)'}; pass {options}"
        )
    return optuna.load_study(study_name=name, storage=store)


def is_surplus(trial: FrozenTrial) -> bool:
    """A trial handed back unrun because the study was already full (see ``claim_slot``)."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(SURPLUS_ATTR))


def is_warm_start(trial: FrozenTrial) -> bool:
    """A trial copied from another study by ``search --warm-start`` (see ``WARM_START_ATTR``)."""
    return WARM_START_ATTR in trial.user_attrs


def finished_here(trials: Iterable[FrozenTrial]) -> int:
    """How many of ``trials`` finished in this study: what ``--trials`` counts."""
    return sum(t.state in FINISHED and not is_warm_start(t) for t in trials)


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The completed trials run in this study, best first by the study's direction."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and not is_warm_start(t)
    ]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(trials, key=lambda t: t.value, reverse=maximize)


def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since the last heartbeat of each running trial that recorded one, by number.

    Measured on the clock that wrote the heartbeats (the database server's, or for a journal
    file the workers' wall clocks), so that a reader on another machine gets the same age.
    """
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if isinstance(storage, JournalStorage):
        now = time.time()
        return {
            t.number: now - t.system_attrs[HEARTBEAT_ATTR]
            for t in running
            if HEARTBEAT_ATTR in t.system_attrs
        }
    # Optuna wraps an RDB storage in a cache; the heartbeats are read from the database.
    storage = getattr(storage, "_backend", storage)
    if not isinstance(storage, optuna.storages.RDBStorage):
        return {}
    ids = {t._trial_id: t.number for t in running}
    with storage.scoped_session() as session:
        now = session.execute(sqlalchemy.func.now()).scalar_one()
        beats = session.query(rdb_models.TrialHeartbeatModel).filter(
            rdb_models.TrialHeartbeatModel.trial_id.in_(list(ids))
        )
        # As Optuna's own staleness check: PostgreSQL returns now() with a time zone.
        now = now.replace(tzinfo=None) if isinstance(now, datetime.datetime) else now
        return {ids[b.trial_id]: (now - b.heartbeat).total_seconds() for b in beats}
