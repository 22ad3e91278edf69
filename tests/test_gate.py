"""The champion gate compares like with like: grouped folds, the selection digest, the re-run
of a champion from another basis, the sealed test split and an honestly chosen threshold."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from mapnet_tune.config import load_study
from mapnet_tune.data import prepare
from mapnet_tune.data.splits import concat
from mapnet_tune.retrain import RetrainRequest, retrain_best, runner
from mapnet_tune.retrain.plan import kfold, make_plan, train_and_val
from mapnet_tune.retrain.sealed import EarlyTestReadError, SealedSplit
from mapnet_tune.retrain.selection import group_folds
from mapnet_tune.tracking import Tracker
from tests.conftest import (
    REGISTERED_STUDY,
    TINY_STUDY,
    rename_cases,
    write_folder,
    write_lung,
    write_study,
)

MODEL = "mapnet-synthetic"


def _sides(split, folds):
    groups = np.asarray(split.image_groups, dtype=object)
    return [(set(groups[rest]), set(groups[held])) for rest, held in folds]


@pytest.mark.parametrize("folds", [2, 3])
def test_no_patient_sits_on_both_sides_of_a_fold_or_of_train_and_test(tmp_path, folds):
    # 8 patients of 3 slices each; slice names sort patient by patient.
    root = write_lung(tmp_path / "lung", count=24, per_patient=3, size=32)
    data = prepare("lung", root, {"size": 16}, cache_dir=tmp_path / "cache")
    patients = {k: set(s.groups) for k, s in data.splits.items()}
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    assert not patients["train"] & patients["val"]
    merged = concat([data.splits["train"], data.splits["val"]])
    cut = group_folds(merged, folds, seed=3)
    for rest, held in _sides(merged, cut):
        assert rest and held and not rest & held
    held_out = np.concatenate([held for _, held in cut])
    assert sorted(held_out.tolist()) == list(range(len(merged.names)))
    # Seeded: the same seed gives the same folds.
    assert [h.tolist() for _, h in group_folds(merged, folds, seed=3)] == [
        h.tolist() for _, h in cut
    ]


def test_retrain_folds_hold_out_whole_patients(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPNET_TUNE_CACHE", str(tmp_path / "cache"))
    root = write_lung(tmp_path / "lung", count=24, per_patient=3, size=32)
    doc = {
        **TINY_STUDY,
        "dataset": {"name": "lung", "source": str(root), "options": {"size": 16}},
        "search_space": {k: v for k, v in TINY_STUDY["search_space"].items() if k != "hue_shift"},
        "retrain": {"folds": 3},
    }
    path = tmp_path / "lung.yaml"
    path.write_text(yaml.safe_dump(doc))
    config = load_study(path)
    params = {"lr": 1e-3, "batch_size": 4, "pos_weight": 1.0, "flip_p": 0.0}
    trial = optuna.trial.create_trial(
        params=params,
        distributions={
            "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
            "batch_size": optuna.distributions.CategoricalDistribution([4]),
            "pos_weight": optuna.distributions.FloatDistribution(1.0, 3.0),
            "flip_p": optuna.distributions.FloatDistribution(0.0, 0.5),
        },
        value=0.5,
    )
    study = optuna.create_study(study_name="lung")
    plan = make_plan(RetrainRequest(), study, config, [trial], [])
    merged = train_and_val(plan.candidates[0].data)
    patient = dict(zip(merged.names, merged.groups, strict=True))
    assert len(plan.basis.folds) == 3 and plan.basis.seed == config.sampler.seed
    for rest, held in kfold(plan, merged):
        assert not {patient[merged.names[i]] for i in rest} & {
            patient[merged.names[i]] for i in held
        }
    # The test split is sealed; its patients are none of the pool's.
    test = plan.candidates[0].data.splits["test"]
    with pytest.raises(EarlyTestReadError):
        test.images  # noqa: B018
    assert not {n[:7] for n in test.names} & set(merged.groups)


def test_folder_groups_are_kept_together_by_the_folds(tmp_path):
    root = write_folder(tmp_path / "own", count=12)
    rename_cases(root, lambda stem, number: f"p{number % 4}_{stem}.png")
    data = prepare(
        "folder", root, {"groups": "^(p\\d)_", "val_fraction": 0.25}, cache_dir=tmp_path / "c"
    )
    merged = concat([data.splits["train"], data.splits["val"]])
    assert len(set(merged.groups)) == 4
    for rest, held in _sides(merged, group_folds(merged, 2, seed=0)):
        assert not rest & held


def test_the_sealed_test_split_raises_until_released(tmp_path):
    test = prepare("synthetic", None, {"size": 16}, cache_dir=tmp_path).splits["test"]
    sealed = SealedSplit(test)
    assert sealed.names == test.names  # names carry no labels
    for name in ("images", "masks", "fov", "extras", "patches"):
        with pytest.raises(EarlyTestReadError, match=f"test split's {name} were read before"):
            getattr(sealed, name)
    assert sealed.release() is test and sealed.masks is test.masks


@pytest.mark.slow
def test_a_selection_that_reads_test_fails(registry, monkeypatch):
    real_best = runner._best

    def peeking(cands, key, maximize):
        # A leak: prefer the candidate with the most test foreground.
        cands[0].data.splits["test"].masks.sum()
        return real_best(cands, key, maximize)

    monkeypatch.setattr(runner, "_best", peeking)
    request = RetrainRequest(study_name=REGISTERED_STUDY, top_k=1, folds=2, force=True)
    with pytest.raises(EarlyTestReadError, match="before registration returned"):
        retrain_best(request)
    assert len(Tracker().versions(MODEL)) == 2  # nothing was registered


@pytest.mark.slow
def test_a_champion_from_another_study_is_rerun_on_the_current_folds(workdir, cli, monkeypatch):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri, uri)
    first = write_study(workdir / "a.yaml")
    assert cli("search", "--config", first, "--trials", 2, "--study", "a").exit_code == 0
    result = cli("retrain-best", "--study", "a", "--top-k", 2, "--folds", 2)
    assert result.exit_code == 0, result.output
    (champion,) = client.search_model_versions(f"name='{MODEL}'")
    tags = champion.tags
    assert len(tags["selection.digest"]) == 16
    assert {"metric.cv/val/iou_fold1", "metric.cv/val/iou_fold2"} <= set(tags)

    # Another sampler seed: other folds, so another digest. Its threshold is tuned.
    second = write_study(
        workdir / "b.yaml", sampler={"seed": 4}, retrain={"epochs": 2, "threshold": "tune"}
    )
    assert cli("search", "--config", second, "--trials", 1, "--study", "b").exit_code == 0
    result = cli("retrain-best", "--study", "b", "--top-k", 1, "--folds", 2)
    assert result.exit_code == 0, result.output
    assert "the selection digest differs from version 1's (folds, seed)" in result.output
    assert f"re-running its candidate t{int(tags['trial']):04d} on the current folds" in (
        result.output
    )
    decision = next(line for line in result.output.splitlines() if "registered as" in line)
    assert "was re-run on the current folds as one more candidate; " in decision
    assert "paired val/iou difference" in decision
    experiment = client.get_experiment_by_name("b")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (rerun,) = [r for r in runs if r.data.tags.get("mapnet_tune.role") == "retrain-champion"]
    assert rerun.data.tags["optuna.trial"] == tags["trial"]
    held = {r.data.params["held_out"] for r in runs if "held_out" in r.data.params}
    assert len(held) == 2  # the champion's candidate was scored on the new study's two folds
    new = max(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert new.tags["selection.digest"] != tags["selection.digest"]

    # The tuned threshold is the card's: evaluate scores test with it, as retrain-best did.
    assert new.tags["threshold.rule"].startswith(
        "tuned on the out-of-fold probabilities of its 2 folds to maximise val/iou"
    )
    result = cli("evaluate", "--model", f"models:/{MODEL}/2", "--dataset", "synthetic")
    assert result.exit_code == 0, result.output
    row = result.output.strip().splitlines()[-1].split()
    assert row[-2] == f"{float(new.tags['metric.test/iou']):.4f}"

    # The re-run's numbers stay on the champion's version: on the same folds again, they are
    # compared without training the champion a second time, even with --gate refuse.
    aliases = client.get_registered_model(MODEL).aliases
    assert aliases["champion"] == 1  # the tiny models tie within CV noise
    recorded = json.loads(
        client.get_model_version(MODEL, "1").tags[f"selection.rerun.{new.tags['selection.digest']}"]
    )
    assert recorded["run"] == rerun.info.run_id and len(recorded["folds"]) == 2
    same_folds = ("--study", "b", "--top-k", 1, "--folds", 2, "--force", "--gate", "refuse")
    result = cli("retrain-best", *same_folds)
    assert result.exit_code == 0, result.output
    assert (
        f"its numbers re-run on the current folds are reused ({rerun.info.run_id})" in result.output
    )
    decision = next(line for line in result.output.splitlines() if "registered as" in line)
    assert "paired val/iou difference" in decision
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert [r.data.tags.get("mapnet_tune.role") for r in runs].count("retrain-champion") == 1

    # --gate refuse: another selection mode (the val split) is not compared at all.
    aliases = client.get_registered_model(MODEL).aliases
    result = cli("retrain-best", "--study", "b", "--folds", 0, "--force", "--gate", "refuse")
    assert result.exit_code == 0, result.output
    assert f"champion stays version {aliases['champion']}, not compared: the selection " in (
        result.output
    )
    assert "--gate refuse was given" in result.output
    assert client.get_registered_model(MODEL).aliases["champion"] == aliases["champion"]
