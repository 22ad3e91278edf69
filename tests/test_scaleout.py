"""Scale-out against real servers, as docs/deploy.md sets them up, minus Docker.

PostgreSQL holds the Optuna storage and a real ``mlflow server`` process tracks the runs,
each in a database made for this module. Workers are real ``mapnet-tune search`` processes,
with a short heartbeat so that a lost worker's trial is retried within seconds.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from mapnet_tune.names import PARENT_ATTR
from mapnet_tune.storage import is_surplus
from tests.conftest import (
    MlflowServer,
    free_port,
    polled_study,
    running_trial,
    study_runs,
    until,
    write_study,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CLI = Path(sys.executable).parent / "mapnet-tune"
HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "5"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Worker:
    """One ``mapnet-tune search`` process, its output kept in a file for failures."""

    def __init__(
        self, workdir: Path, cfg: Path, study: str, trials: int, storage: str, tracking_uri: str
    ) -> None:
        self.log = workdir / f"worker-{secrets.token_hex(3)}.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "MAPNET_TUNE_STORAGE")
        }
        env["MAPNET_TUNE_CACHE"] = str(workdir / "cache")
        # Two workers on one machine, each with its share of the cores, as docs/deploy.md
        # advises: a thread per core in each made every step wait on the other's threads.
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // 2))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(CLI),
                    "search",
                    "--config",
                    str(cfg),
                    "--study",
                    study,
                    "--trials",
                    str(trials),
                    "--storage",
                    storage,
                    "--tracking-uri",
                    tracking_uri,
                    *HEARTBEAT,
                ],
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def finish(self, timeout: float = 300) -> str:
        """Wait for a successful exit; returns the output."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"worker still running after {timeout} s:\n{self.output()}"
            ) from None
        assert code == 0, self.output()
        return self.output()

    def output(self) -> str:
        """Everything the worker printed so far."""
        return self.log.read_text()


def test_two_workers_share_one_study(servers, tmp_path):
    storage, server = servers
    cfg = write_study(tmp_path / "tiny.yaml")
    workers = [Worker(tmp_path, cfg, "pair", 6, storage, server.url) for _ in range(2)]
    outputs = [w.finish() for w in workers]

    study = polled_study(storage, "pair")
    trials = study.get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 6
    assert len({t.number for t in finished}) == 6
    # The only failures allowed are trials handed back unrun when the other worker took the
    # last slot first.
    assert all(is_surplus(t) for t in trials if t.state == TrialState.FAIL)
    assert all(" done: " in out for out in outputs), "each worker runs trials"

    parents, children = study_runs(MlflowClient(server.url), "pair")
    assert [p.info.run_id for p in parents] == [study.user_attrs[PARENT_ATTR]]
    assert len(children) == 6
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in finished}
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_killed_worker_trial_is_failed_and_retried(servers, tmp_path):
    storage, server = servers
    cfg = write_study(tmp_path / "long.yaml", train={"epochs": 10})
    first = Worker(tmp_path, cfg, "kill", 2, storage, server.url)
    lost = until(lambda: running_trial(storage, "kill"), 180, "a trial mid-training")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()

    # A new worker finds the trial silent past the grace period, fails it, runs it again.
    out = Worker(tmp_path, cfg, "kill", 2, storage, server.url).finish()
    assert f"t{lost.number:04d} FAILED: worker lost" in out

    trials = polled_study(storage, "kill").get_trials()
    assert trials[lost.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE]
    assert retries[0].params == lost.params
    assert sum(t.state in FINISHED for t in trials) == 2

    client = MlflowClient(server.url)
    run = client.get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "no heartbeat" in run.data.tags["mapnet_tune.end_reason"]
    _, children = study_runs(client, "kill")
    assert all(r.info.status != "RUNNING" for r in children)


def test_unreachable_tracking_server_fails_fast(servers, tmp_path):
    storage, _ = servers
    cfg = write_study(tmp_path / "tiny.yaml")
    down = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [
            str(CLI),
            "search",
            "--config",
            str(cfg),
            "--study",
            "down",
            "--trials",
            "1",
            "--storage",
            storage,
            "--tracking-uri",
            down,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MAPNET_TUNE_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: MLflow tracking server {down} is not reachable")
    assert "down" not in optuna.get_all_study_names(storage)


def test_tracking_outage_mid_trial(new_database, tmp_path):
    storage = new_database("optuna_outage")
    server = MlflowServer(new_database("mlflow_outage"), tmp_path)
    server.start()
    try:
        cfg = write_study(tmp_path / "long.yaml", train={"epochs": 10})
        worker = Worker(tmp_path, cfg, "outage", 2, storage, server.url)
        trial = until(lambda: running_trial(storage, "outage"), 180, "a trial mid-training")
        server.stop()
        # The trial's result reaches Optuna while the server is down.
        until(
            lambda: (
                polled_study(storage, "outage").trials[trial.number].state == TrialState.COMPLETE
            ),
            90,
            "the trial to complete without the tracking server",
        )
        server.start()
        out = worker.finish()
        run = MlflowClient(server.url).get_run(trial.user_attrs["mlflow_run_id"])
    finally:
        server.stop()
    assert "is unreachable" in out and "is marked FINISHED when the server returns" in out
    assert run.info.status == "FINISHED"
    assert len(polled_study(storage, "outage").get_trials(states=(TrialState.COMPLETE,))) == 2
