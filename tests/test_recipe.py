"""The recipe is the one path from a study file's hyperparameter to the optimiser: searched by
Optuna, handed to the engine's Adam, and carried unchanged into retrain-best."""

from __future__ import annotations

import optuna
import torch
from mlflow import MlflowClient

from mapnet_tune import engine
from mapnet_tune.config import load_study
from mapnet_tune.data import prepare
from mapnet_tune.model import MAPNet
from tests.conftest import TINY_STUDY, write_study


def test_a_new_hyperparameter_reaches_the_optimiser_and_the_retrain(workdir, cli):
    space = {**TINY_STUDY["search_space"], "weight_decay": {"low": 1e-4, "high": 1e-1, "log": True}}
    cfg = write_study(workdir / "decay.yaml", search_space=space)

    result = cli("search", "--config", cfg, "--trials", "1", "--study", "decay")
    assert result.exit_code == 0, result.output
    trial = optuna.load_study(study_name="decay", storage="sqlite:///optuna.db").best_trial
    decay = trial.params["weight_decay"]
    assert 1e-4 <= decay <= 1e-1
    assert isinstance(trial.distributions["weight_decay"], optuna.distributions.FloatDistribution)
    assert trial.distributions["weight_decay"].log
    client = MlflowClient("sqlite:///mlflow.db")
    searched = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert float(searched.data.params["hp.weight_decay"]) == decay

    result = cli("retrain-best", "--study", "decay", "--top-k", "1", "--folds", "0")
    assert result.exit_code == 0, result.output
    experiment = client.get_experiment_by_name("decay")
    retrained = client.search_runs(
        [experiment.experiment_id], "tags.`mapnet_tune.role` = 'retrain-trial'"
    )
    assert [float(r.data.params["hp.weight_decay"]) for r in retrained] == [decay]


def test_weight_decay_changes_the_adam_step(workdir):
    study = load_study(write_study(workdir / "tiny.yaml"))
    data = prepare(study.dataset.name, None, study.dataset.options)
    trained = []
    for decay in (0.0, 0.5):
        torch.manual_seed(0)
        model = MAPNet(in_channels=data.channels, width=0.0625)
        settings = engine.TrainSettings(
            epochs=1, batch_size=4, lr=1e-2, steps_per_epoch=1, weight_decay=decay
        )
        engine.fit(model, data.splits["train"], None, settings, device=torch.device("cpu"))
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # Decoupled decay shrinks every weight by lr x decay on top of the same Adam step.
    assert not torch.allclose(trained[0], trained[1])
    assert trained[1].norm() < trained[0].norm()
