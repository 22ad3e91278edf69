"""``search --warm-start``: an earlier study's finished trials seed a new one's sampler."""

from __future__ import annotations

import math

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from mapnet_tune.config import load_study
from mapnet_tune.errors import UserError
from mapnet_tune.plots import own_trials
from mapnet_tune.recipe import suggest
from mapnet_tune.storage import WARM_START_ATTR, finished_here, ranked_trials
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.study.sampling import make_sampler
from mapnet_tune.study.warmstart import FROM_RUN_TAG, copy_trials, open_source
from tests.conftest import TINY_STUDY, study_runs, write_study


def _old_study(url: str, name: str, good_lr: str, objective: str = "val/iou") -> None:
    """A finished study of the tiny file whose best trials sit at one end of the lr range."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_user_attr("dataset", "synthetic")
    study.set_user_attr("objective", objective)
    lrs = [1e-3 * 10 ** (i / 7) for i in range(8)]  # 1e-3 .. 1e-2, log-spaced
    space = {
        "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
        "pos_weight": optuna.distributions.FloatDistribution(1.0, 3.0),
        "flip_p": optuna.distributions.FloatDistribution(0.0, 0.5),
        "hue_shift": optuna.distributions.IntDistribution(0, 10),
    }
    for i, lr in enumerate(lrs):
        rank = i if good_lr == "high" else len(lrs) - 1 - i
        params = {"lr": lr, "pos_weight": 2.0, "flip_p": 0.25, "hue_shift": 5}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=space, value=0.1 + 0.1 * rank / len(lrs)
            )
        )


def _request(tmp_path, url: str, old: str, **overrides) -> SearchRequest:
    return SearchRequest(
        study=load_study(write_study(tmp_path / f"{old}.yaml", **overrides)),
        study_name=f"from-{old}",
        storage=url,
        tracking_uri=None,
        trials=1,
        warm_start=old,
        warm_storage=url,
    )


def _first_suggestion(tmp_path, url: str, old: str, sampler: str) -> dict:
    req = _request(tmp_path, url, old, sampler={"name": sampler})
    study = optuna.create_study(
        study_name=req.study_name,
        storage=url,
        direction="maximize",
        sampler=make_sampler(req.study),
    )
    warm = copy_trials(study, open_source(req), req)
    assert len(warm.copied) == 8 and warm.skipped == 0
    return suggest(study.ask(), req.study)


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_the_first_suggestion_follows_the_warm_start(tmp_path, sampler):
    # Two old studies tried the same parameters and disagree on which end of the lr range is
    # good; the new studies' first trials have the same number and seed, so any difference
    # in what they suggest comes from the copied trials.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _old_study(url, "high-lr-wins", good_lr="high")
    _old_study(url, "low-lr-wins", good_lr="low")

    high = _first_suggestion(tmp_path, url, "high-lr-wins", sampler)
    low = _first_suggestion(tmp_path, url, "low-lr-wins", sampler)

    mid = math.sqrt(1e-3 * 1e-2)
    assert high["lr"] > mid > low["lr"]


def test_only_trials_inside_the_new_space_are_copied(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _old_study(url, "old", good_lr="high")
    # The new space keeps the upper half of the lr range (4 of the 8 old values) and fixes
    # hue_shift at the value every old trial used.
    req = _request(
        tmp_path,
        url,
        "old",
        search_space={
            **TINY_STUDY["search_space"],
            "lr": {"low": 3.2e-3, "high": 1e-2, "log": True},
            "hue_shift": 5,
        },
    )
    study = optuna.create_study(study_name="new", storage=url, direction="maximize")
    warm = copy_trials(study, open_source(req), req)

    assert (len(warm.copied), warm.skipped) == (4, 4)
    assert "copied 4 finished trial(s) (0 pruned), skipped 4 outside" in warm.line()
    trials = study.get_trials()
    assert all(t.user_attrs[WARM_START_ATTR]["study"] == "old" for t in trials)
    assert all(t.params["lr"] >= 3.2e-3 and "hue_shift" not in t.params for t in trials)
    # They inform the sampler but are not this study's trials.
    assert finished_here(trials) == 0 and ranked_trials(study) == []


def test_a_study_of_another_objective_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _old_study(url, "loss", good_lr="high", objective="train/loss")
    with pytest.raises(UserError, match="has objective metric 'train/loss' but .* 'val/iou'"):
        open_source(_request(tmp_path, url, "loss"))


@pytest.mark.slow
def test_warm_start_end_to_end(workdir, cli):
    old_cfg = write_study(workdir / "tiny.yaml")
    assert cli("search", "--config", old_cfg, "--trials", 3, "--study", "old").exit_code == 0
    storage = "sqlite:///optuna.db"
    old = optuna.load_study(study_name="old", storage=storage).get_trials()
    # The new file searches only the lower part of the old lr range.
    lrs = sorted(t.params["lr"] for t in old)
    high = (lrs[1] + lrs[2]) / 2
    new_cfg = write_study(
        workdir / "narrow.yaml",
        search_space={**TINY_STUDY["search_space"], "lr": {"low": 1e-3, "high": high}},
    )

    result = cli(
        "search", "--config", new_cfg, "--trials", 1, "--study", "new", "--warm-start", "old"
    )
    assert result.exit_code == 0, result.output
    assert "warm start from study 'old': copied 2 finished trial(s) (0 pruned), skipped 1" in (
        result.output
    )
    new = optuna.load_study(study_name="new", storage=storage)
    warm = [t for t in new.trials if WARM_START_ATTR in t.user_attrs]
    own = [t for t in new.trials if WARM_START_ATTR not in t.user_attrs]
    assert [t.number for t in warm] == [0, 1] and [t.number for t in own] == [2]
    by_number = {t.number: t for t in old}
    for copy in warm:
        origin = by_number[copy.user_attrs[WARM_START_ATTR]["trial"]]
        assert copy.value == origin.value and copy.params == origin.params
        assert copy.user_attrs["mlflow_run_id"] == origin.user_attrs["mlflow_run_id"]
    assert own[0].state == TrialState.COMPLETE  # --trials 1 counted only the new trial

    client = MlflowClient("sqlite:///mlflow.db")
    parents, children = study_runs(client, "new")
    assert [r.info.run_id for r in children] == [own[0].user_attrs["mlflow_run_id"]]
    exp = client.get_experiment_by_name("new")
    links = client.search_runs(
        [exp.experiment_id], "tags.`mapnet_tune.role` = 'warm-start'", max_results=100
    )
    assert sorted(r.data.tags[FROM_RUN_TAG] for r in links) == sorted(
        t.user_attrs["mlflow_run_id"] for t in warm
    )
    for run in links:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert client.get_run(run.data.tags[FROM_RUN_TAG]).info.status == "FINISHED"

    status = cli("status", "--study", "new")
    assert "study new: 1 complete" in status.output
    assert "warm start: 2 finished trial(s) copied from old (not counted above)" in status.output

    # The report's history is the new study's own search; the copies stay in the storage.
    assert [t.value for t in own_trials(new).trials] == [own[0].value]
    report = cli("report", "--study", "new")
    assert report.exit_code == 0, report.output
    note = "the optimization history plot leaves out the 2 trial(s) copied by --warm-start"
    assert note in (workdir / "reports" / "new" / "report.md").read_text()

    # Resuming copies nothing again; another warm start of an existing study is refused.
    again = cli(
        "search", "--config", new_cfg, "--trials", 1, "--study", "new", "--warm-start", "old"
    )
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="new", storage=storage).trials) == 3
    other = cli("search", "--config", new_cfg, "--trials", 1, "--study", "new", "--warm-start", "x")
    assert other.exit_code == 2 and "no study 'x'" in other.output
