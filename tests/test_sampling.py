"""The samplers a study file can name: seeded, shared by several workers, and refused in one
line where they cannot sample the space."""

from __future__ import annotations

import math

import optuna
import pytest

from mapnet_tune.config import parse_study
from mapnet_tune.errors import UserError
from mapnet_tune.recipe import suggest
from mapnet_tune.storage import open_storage
from mapnet_tune.study.sampling import make_sampler
from tests.conftest import TINY_STUDY, write_study


def _config(sampler: str, **space):
    doc = {
        **TINY_STUDY,
        "sampler": {**TINY_STUDY["sampler"], "name": sampler},
        "search_space": {**TINY_STUDY["search_space"], **space},
    }
    return parse_study(doc, f"{sampler}.yaml")


def _score(params: dict) -> float:
    """A smooth stand-in for val/iou, best at lr 3e-3 and pos_weight 2."""
    return -((math.log10(params["lr"]) - math.log10(3e-3)) ** 2) - (params["pos_weight"] - 2) ** 2


def _two_workers(url: str, sampler: str, rounds: int) -> list[list[dict]]:
    """Two workers on one storage, each starting a trial while the other's is running."""
    config = _config(sampler)
    studies = [
        optuna.create_study(
            study_name="shared",
            storage=open_storage(url, heartbeat=False),
            direction="maximize",
            sampler=make_sampler(config),
            load_if_exists=True,
        )
        for _ in range(2)
    ]
    history = []
    for _ in range(rounds):
        trials = [study.ask() for study in studies]  # the second asks while the first runs
        params = [suggest(trial, config) for trial in trials]
        for study, trial, p in zip(studies, trials, params, strict=True):
            study.tell(trial, _score(p))
        history.append(params)
    return history


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["tpe", "gp", "random", "cmaes"])
def test_each_sampler_is_seeded_and_shared_by_two_workers(tmp_path, sampler):
    first = _two_workers(f"sqlite:///{tmp_path / 'a.db'}", sampler, rounds=6)
    again = _two_workers(f"sqlite:///{tmp_path / 'b.db'}", sampler, rounds=6)

    assert first == again, "the same study seed gives the same suggestions"
    for running, started in first:
        assert running != started, "a worker does not propose what another one is running"
    done = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert len(done.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 12


def test_cmaes_with_a_categorical_is_refused_in_one_line(workdir, cli):
    cfg = write_study(
        workdir / "cma.yaml",
        sampler={"name": "cmaes"},
        search_space={"batch_size": {"choices": [4, 8]}},
    )
    result = cli("search", "--config", cfg, "--trials", 1)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: study file {cfg}: key 'sampler.name' is 'cmaes', which cannot sample the "
        f"categorical search_space.batch_size; give batch_size as a range ({{low, high, int: "
        f"true}} for integers) or one value, or use sampler tpe, gp or random"
    ]
    assert not (workdir / "optuna.db").exists()
    # An integer range, or a single choice, is what CMA-ES can take.
    assert _config("cmaes", batch_size={"low": 4, "high": 8, "int": True}).sampler.name == "cmaes"
    assert _config("cmaes", batch_size={"choices": [4]}).sampler.name == "cmaes"


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(UserError, match="valid values: tpe, gp, random, cmaes"):
        _config("bohb")
