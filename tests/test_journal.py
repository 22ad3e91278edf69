"""Journal-file storage (``journal:///``): its URLs, the commands that read it, and the
heartbeats that mapnet-tune adds to it so that a lost worker's trial is retried."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mapnet_tune.errors import UserError
from mapnet_tune.storage import (
    HEARTBEAT_ATTR,
    HeartbeatJournalStorage,
    journal_path,
    open_storage,
    retry_lost,
)
from mapnet_tune.study.recovery import fail_lost_trials
from mapnet_tune.study.summary import trials_table


def test_three_slashes_are_relative_four_absolute():
    assert journal_path("journal:///study.log") == Path("study.log")
    assert journal_path("journal:///runs/study.log") == Path("runs/study.log")
    assert journal_path("journal:////shared/optuna/study.log") == Path("/shared/optuna/study.log")
    assert journal_path("postgresql+psycopg2://u@h/db") is None
    for bad in ("journal://study.log", "journal:///", "journal:"):
        with pytest.raises(UserError, match="names no journal file"):
            journal_path(bad)


def test_reading_a_missing_journal_exits_2_and_creates_nothing(workdir, cli):
    result = cli("status", "--storage", "journal:///missing.log")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: Optuna journal missing.log does not exist; check --storage or "
        "MAPNET_TUNE_STORAGE (journal:///relative/path or journal:////absolute/path), or run "
        "mapnet-tune search first"
    ]
    assert not (workdir / "missing.log").exists()


def test_journal_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot be opened .* create its folder"):
        open_storage(f"journal:///{tmp_path}/no/such/folder/study.log")


# The test asks for its trial by hand instead of through Study.optimize.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_silent_trial_is_failed_and_requeued_by_another_worker(tmp_path):
    url = f"journal:///{tmp_path}/study.log"
    owner = open_storage(url, heartbeat_s=1, grace_s=2)
    watcher = open_storage(url, heartbeat_s=1, grace_s=2)
    assert isinstance(watcher, HeartbeatJournalStorage)
    study = optuna.create_study(study_name="s", storage=owner)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    owner.record_heartbeat(trial._trial_id)
    seen = optuna.load_study(study_name="s", storage=watcher)

    fail_lost_trials(seen)  # first look: the watcher starts its clock for this heartbeat
    time.sleep(1.2)
    owner.record_heartbeat(trial._trial_id)  # alive: a new heartbeat resets the clock
    fail_lost_trials(seen)
    time.sleep(1.2)
    fail_lost_trials(seen)
    assert seen.trials[trial.number].state == TrialState.RUNNING

    time.sleep(1.2)  # silent for more than the grace period since the watcher saw its beat
    fail_lost_trials(seen)
    trials = seen.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    assert [t.state for t in trials[1:]] == [TrialState.WAITING]
    assert trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == trial.number
    assert HEARTBEAT_ATTR in trials[0].system_attrs
    # The lost worker's next heartbeat is dropped, not an error in its heartbeat thread.
    owner.record_heartbeat(trial._trial_id)


def test_readers_get_no_heartbeats(tmp_path):
    url = f"journal:///{tmp_path}/study.log"
    store = open_storage(url, heartbeat=False)
    assert not isinstance(store, HeartbeatJournalStorage)
    assert isinstance(open_storage(url, on_lost=retry_lost()), HeartbeatJournalStorage)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_status_shows_a_silent_trial_as_stale(tmp_path):
    url = f"journal:///{tmp_path}/study.log"
    owner = open_storage(url, heartbeat_s=1, grace_s=2)
    study = optuna.create_study(study_name="s", storage=owner)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    owner.record_heartbeat(trial._trial_id)
    reader = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=False))

    assert "t0000 running (last heartbeat " in trials_table(reader, grace_s=2)
    time.sleep(2.5)
    assert re.search(
        r"t0000 stale \(no heartbeat since \d\d:\d\d:\d\d, will be retried\)",
        trials_table(reader, grace_s=2),
    )
