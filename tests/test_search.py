"""`mapnet-tune search` end to end on the synthetic set: Optuna storage and MLflow agree."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import write_study

pytestmark = pytest.mark.slow


def _study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage="sqlite:///optuna.db")


def _runs(client: MlflowClient, study_name: str):
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mapnet_tune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mapnet_tune.role") == "trial"]
    return parents, children


def test_search_logs_trials_and_resumes(workdir, cli):
    cfg = write_study(workdir / "tiny.yaml")
    result = cli("search", "--config", cfg, "--trials", 3, "--study", "tiny")
    assert result.exit_code == 0, result.output
    assert "t0000" in result.output and "mapnet-tune ui" in result.output

    study = _study("tiny")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3
    # optuna-dashboard and Optuna's plots label the objective with it.
    assert study.metric_names == ["val/iou"]
    client = MlflowClient("sqlite:///mlflow.db")
    parents, children = _runs(client, "tiny")
    assert len(parents) == 1 and len(children) == 3
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"  # the study reached its --trials
    for trial in done:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"synthetic-t{trial.number:04d}"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["dataset.fingerprint"] and run.data.tags["git.sha"]
        assert float(run.data.params["hp.lr"]) == pytest.approx(trial.params["lr"])
        assert run.data.params["train.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "val/iou")
        assert sorted(m.step for m in history) == [0, 1]
        for key in ("train/loss", "val/f1", "val/auc"):
            assert client.get_metric_history(run.info.run_id, key)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
        assert artifacts == ["overlays/best_epoch.png"]
        assert trial.value == pytest.approx(max(m.value for m in history))

    # The same command with a larger total resumes the study and its parent run.
    result = cli("search", "--config", cfg, "--trials", 5, "--study", "tiny")
    assert result.exit_code == 0, result.output
    assert len(_study("tiny").get_trials(states=(TrialState.COMPLETE,))) == 5
    parents_again, children = _runs(client, "tiny")
    assert [p.info.run_id for p in parents_again] == [parents[0].info.run_id]
    assert len(children) == 5

    status = cli("status")  # the storage's only study
    assert status.exit_code == 0 and "study tiny: 5 complete" in status.output

    # export-best writes parameters that search --enqueue puts first in a new study.
    assert cli("export-best", "--study", "tiny", "--out", "best.yaml").exit_code == 0
    best = yaml.safe_load((workdir / "best.yaml").read_text())
    assert best["trials"][0]["value"] == pytest.approx(_study("tiny").best_value)
    result = cli(
        "search", "--config", cfg, "--trials", 1, "--study", "warm", "--enqueue", "best.yaml"
    )
    assert result.exit_code == 0, result.output
    assert _study("warm").trials[0].params == best["trials"][0]["params"]


def test_pruned_trial_is_killed_run(workdir, cli):
    # The training loss is ordered by pos_weight from the first epoch on, so the median
    # pruner must stop the trial with the large weight once two low-weight trials finished.
    cfg = write_study(
        workdir / "prune.yaml",
        objective={"metric": "train/loss", "direction": "minimize"},
        pruner={"name": "median", "n_warmup_steps": 0},
        search_space={"lr": 0.003, "batch_size": 4, "pos_weight": {"choices": [0.5, 50.0]}},
    )
    queue = workdir / "queue.yaml"
    # Distinct flip_p values: enqueueing skips parameter sets that are already queued.
    queue.write_text(
        yaml.safe_dump(
            {
                "trials": [
                    {"params": {"pos_weight": 0.5, "flip_p": 0.1}},
                    {"params": {"pos_weight": 0.5, "flip_p": 0.2}},
                    {"params": {"pos_weight": 50.0}},
                ]
            }
        )
    )
    result = cli("search", "--config", cfg, "--trials", 3, "--study", "prune", "--enqueue", queue)
    assert result.exit_code == 0, result.output
    pruned = _study("prune").get_trials(states=(TrialState.PRUNED,))
    assert [t.params["pos_weight"] for t in pruned] == [50.0]
    run = MlflowClient("sqlite:///mlflow.db").get_run(pruned[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert "pruned at epoch 1" in run.data.tags["mapnet_tune.end_reason"]


def test_failing_trial_is_failed_and_study_goes_on(workdir, cli):
    # A batch of 64 cannot be drawn from 8 training images: that trial must fail alone.
    cfg = write_study(workdir / "fail.yaml", search_space={"batch_size": {"choices": [4, 64]}})
    queue = workdir / "queue.yaml"
    queue.write_text(yaml.safe_dump({"trials": [{"params": {"batch_size": 64}}]}))
    result = cli("search", "--config", cfg, "--trials", 2, "--study", "fail", "--enqueue", queue)
    assert result.exit_code == 0, result.output
    study = _study("fail")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and failed[0].number == 0
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    client = MlflowClient("sqlite:///mlflow.db")
    for trial in failed:  # the sampler may try 64 again; each such trial fails alone
        assert trial.params["batch_size"] == 64
        assert "batch size 64" in trial.user_attrs["fail_reason"]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert "batch size 64" in run.data.tags["mapnet_tune.end_reason"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "search needs --dataset NAME or --config FILE"),
        (("--dataset", "retina"), "no study file for dataset 'retina'"),
        (("--config", "missing.yaml"), "study file missing.yaml does not exist"),
        (("--timeout", "soon"), "--timeout 'soon' is not a duration"),
        (("--tracking-uri", "http://127.0.0.1:9"), "MLflow tracking server http://127.0.0.1:9"),
        (("--storage", "postgresql+psycopg2://nobody@127.0.0.1:9/none"), "Optuna storage"),
    ],
)
def test_bad_search_options_exit_2(workdir, cli, args, needle):
    cfg = write_study(workdir / "tiny.yaml")
    extra = () if args[:1] in (("--dataset",), ("--config",), ()) else ("--config", cfg)
    result = cli("search", *extra, *args)
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not (workdir / "mlruns").exists()


def test_changed_study_file_does_not_mix_into_old_study(workdir, cli):
    cfg = write_study(workdir / "tiny.yaml")
    assert cli("search", "--config", cfg, "--trials", 1, "--study", "s").exit_code == 0
    write_study(cfg, train={"epochs": 1})
    result = cli("search", "--config", cfg, "--trials", 2, "--study", "s")
    assert result.exit_code == 2 and "--study NEW_NAME" in result.output


def test_status_of_unknown_study(workdir, cli):
    result = cli("status", "--study", "nothing")
    assert result.exit_code == 2 and "no study 'nothing'" in result.output
    result = cli("status")
    assert result.exit_code == 2 and "run mapnet-tune search first" in result.output


def _oom_when_batch_above_2(monkeypatch):
    # A CUDA out-of-memory error cannot be provoked on the CPU; raise it where the GPU would.
    from mapnet_tune import engine

    real_fit = engine.fit

    def fit_that_runs_out_of_memory(model, train, val, settings, **kwargs):
        if settings.batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(model, train, val, settings, **kwargs)

    monkeypatch.setattr(engine, "fit", fit_that_runs_out_of_memory)


def test_out_of_memory_trial_is_requeued_with_half_the_batch(workdir, cli, monkeypatch):
    _oom_when_batch_above_2(monkeypatch)
    cfg = write_study(workdir / "oom.yaml", search_space={"batch_size": {"choices": [4, 2]}})
    result = cli(
        "search",
        "--config",
        cfg,
        "--trials",
        1,
        "--study",
        "oom",
        "--enqueue",
        _enqueued(workdir, batch_size=4),
    )
    assert result.exit_code == 0, result.output
    first, retry = _study("oom").trials
    assert first.state == TrialState.FAIL and first.params["batch_size"] == 4
    assert "re-queued with batch size 2" in first.user_attrs["fail_reason"]
    # The retry records the batch it ran with, so the sampler learns a true point.
    assert retry.state == TrialState.COMPLETE and retry.params["batch_size"] == 2
    assert {k: v for k, v in retry.params.items() if k != "batch_size"} == {
        k: v for k, v in first.params.items() if k != "batch_size"
    }
    assert retry.user_attrs["retry_of"] == 0
    run = MlflowClient("sqlite:///mlflow.db").get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.params["hp.batch_size"] == "2"


def test_a_study_whose_trials_all_fail_stops_and_says_why(workdir, cli, monkeypatch):
    _oom_when_batch_above_2(monkeypatch)
    cfg = write_study(workdir / "oom.yaml")  # batch size 4 only: half is outside the space
    result = cli("search", "--config", cfg, "--trials", 2, "--study", "oom")
    assert result.exit_code == 2
    assert "half the batch (2) is outside the search space of batch_size" in result.output
    assert "the last 5 trials failed" in result.output and "Traceback" not in result.output
    trials = _study("oom").trials
    assert len(trials) == 5 and all(t.state == TrialState.FAIL for t in trials)


def _enqueued(workdir, **params) -> str:
    path = workdir / "first.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trials": [
                    {
                        "params": {
                            "lr": 2e-3,
                            "pos_weight": 2.0,
                            "flip_p": 0.1,
                            "hue_shift": 3,
                            **params,
                        }
                    }
                ]
            }
        )
    )
    return str(path)


def test_missing_dataset_source_writes_nothing(workdir, cli):
    result = cli("search", "--dataset", "drive", "--trials", 1)
    assert result.exit_code == 2
    assert "mapnet-tune prepare --dataset drive --source PATH" in result.output
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()
