"""A worker killed mid-trial on the embedded SQLite default: ``status`` shows its trial as stale
once the heartbeat is older than the grace period, and the next ``search`` retries it."""

from __future__ import annotations

import datetime
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import running_trial, until, write_study

pytestmark = pytest.mark.slow

CLI = Path(sys.executable).parent / "mapnet-tune"
HEARTBEAT = ("--heartbeat-interval", "1", "--grace-period", "3")
STALE = re.compile(r"t0000 stale \(no heartbeat since (\d\d:\d\d:\d\d), will be retried\)")


def test_a_killed_workers_trial_is_shown_stale_and_retried(workdir, cli, monkeypatch):
    # MLflow keeps one engine per tracking URI in a process: a relative sqlite:///mlflow.db
    # would stay on another test's folder for the in-process rerun below, not the worker's.
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    cfg = write_study(workdir / "long.yaml", train={"epochs": 12})
    search = ("search", "--config", cfg, "--study", "gone", "--trials", 1, *HEARTBEAT)
    with open(workdir / "worker.log", "wb") as log:
        # No --storage: the embedded default, sqlite:///optuna.db in the working directory.
        worker = subprocess.Popen(
            [str(CLI), *map(str, search)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"sqlite:///{workdir / 'optuna.db'}"
    try:
        lost = until(lambda: running_trial(url, "gone"), 180, "a trial mid-training")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    killed_at = datetime.datetime.now()

    shown = until(
        lambda: STALE.search(cli("status", "--study", "gone", "--grace-period", 3).output),
        30,
        "status to show the trial stale",
    )
    beat = datetime.datetime.combine(killed_at.date(), datetime.time.fromisoformat(shown[1]))
    assert datetime.timedelta(0) <= killed_at - beat < datetime.timedelta(seconds=3)

    result = cli(*search)
    assert result.exit_code == 0, result.output
    assert "t0000 FAILED: worker lost: no heartbeat for 3 s; re-queued" in result.output
    trials = optuna.load_study(study_name="gone", storage=url).get_trials()
    assert trials[lost.number].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == lost.number)
    assert retry.state == TrialState.COMPLETE and retry.params == lost.params
    run = MlflowClient(tracking).get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "stale" not in cli("status", "--study", "gone").output
