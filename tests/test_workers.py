"""The ``--gpus`` launcher: the worker command lines it builds and the stores it refuses."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mapnet_tune.cli import main
from mapnet_tune.config import load_study
from mapnet_tune.storage import is_surplus
from mapnet_tune.study.launcher import worker_specs
from mapnet_tune.study.recovery import SurplusTrial, claim_slot
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.study.summary import trials_table
from tests.conftest import write_study

STORAGE = "postgresql+psycopg2://optuna:s3cret@db.internal:5432/optuna"


def test_one_pinned_worker_per_gpu_slot(tmp_path):
    req = SearchRequest(
        study=load_study(write_study(tmp_path / "tiny.yaml")),
        study_name="tiny",
        storage=STORAGE,
        tracking_uri="http://mlflow:5000",
        trials=8,
        timeout_s=1800.0,
        enqueue=Path("best.yaml"),
        heartbeat_s=7,
        grace_s=21,
    )
    specs = worker_specs(req, ["0", "2"], per_gpu=2)

    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "0", "2", "2"]
    for i, spec in enumerate(specs):
        assert spec.argv[:4] == [sys.executable, "-m", "mapnet_tune.cli", "search"]
        assert "s3cret" not in " ".join(spec.argv), "passwords travel in the environment"
        assert spec.env["MAPNET_TUNE_STORAGE"] == STORAGE
        assert spec.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        params = main.commands["search"].make_context("search", spec.argv[4:]).params
        assert params["gpus"] is None and params["device"] is None
        assert (params["trials"], params["study_name"]) == (8, "tiny")
        assert (params["heartbeat_interval"], params["grace_period"]) == (7, 21)
        assert params["timeout"] == "1800s"
        assert Path(params["config_path"]) == (tmp_path / "tiny.yaml").resolve()
        # One worker queues the file; the others find its entries in the storage.
        assert (params["enqueue"] is not None) == (i == 0)


def test_gpus_refuse_sqlite_storage(workdir, cli):
    cfg = write_study(workdir / "tiny.yaml")
    result = cli("search", "--config", cfg, "--gpus", "0,1")
    assert result.exit_code == 2
    assert "--gpus needs a shared Optuna storage, not SQLite" in result.output
    assert "database is locked" in result.output and "postgresql+psycopg2://" in result.output
    assert not (workdir / "optuna.db").exists()


def test_gpus_refuse_sqlite_tracking(workdir, cli):
    cfg = write_study(workdir / "tiny.yaml")
    result = cli("search", "--config", cfg, "--gpus", "0", "--storage", STORAGE)
    assert result.exit_code == 2
    assert "--gpus needs an MLflow tracking server, not SQLite" in result.output


def test_bad_gpu_options_exit_2(workdir, cli):
    cfg = write_study(workdir / "tiny.yaml")
    result = cli("search", "--config", cfg, "--gpus", "0,x")
    assert result.exit_code == 2 and "--gpus '0,x' must list distinct GPU indices" in result.output
    result = cli("search", "--config", cfg, "--trials-per-gpu", "2")
    assert result.exit_code == 2 and "--trials-per-gpu needs --gpus" in result.output
    result = cli("search", "--config", cfg, "--heartbeat-interval", "30", "--grace-period", "30")
    assert result.exit_code == 2 and "--grace-period (30 s) must be longer" in result.output


def test_trial_beyond_the_total_is_handed_back(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    running = study.ask()
    study.enqueue_trial({"lr": 0.01}, user_attrs={"retry_of": 7})
    late = study.ask()  # a second worker takes the queued trial for the same last slot

    claim_slot(running, target=1)
    with pytest.raises(SurplusTrial):
        claim_slot(late, target=1)
    study.tell(late, state=TrialState.FAIL)

    assert is_surplus(study.trials[late.number])
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in queued] == [{"lr": 0.01}]
    assert queued[0].user_attrs == {"retry_of": 7}
    assert "0 fail" in trials_table(study)


def test_every_worker_gets_the_warm_start_and_its_storage_in_the_environment(tmp_path):
    old = "postgresql+psycopg2://optuna:0ld@db.internal:5432/old"
    req = SearchRequest(
        study=load_study(write_study(tmp_path / "tiny.yaml")),
        study_name="tiny-v2",
        storage=STORAGE,
        tracking_uri="http://mlflow:5000",
        trials=8,
        warm_start="tiny",
        warm_storage=old,
    )
    for spec in worker_specs(req, ["0", "1"], per_gpu=1):
        assert "0ld" not in " ".join(spec.argv)
        assert spec.env["MAPNET_TUNE_WARM_STORAGE"] == old
        ctx = main.commands["search"].make_context("search", spec.argv[4:])
        assert ctx.params["warm_start"] == "tiny"
