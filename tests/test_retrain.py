"""retrain-best end to end on the tiny study: registration, tags, aliases, dedup, folds."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shutil

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from mapnet_tune import engine
from mapnet_tune.config import STUDIES_DIR, load_study, parse_study
from mapnet_tune.data import Split, prepare
from mapnet_tune.data.splits import concat, take
from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet
from mapnet_tune.predict import load_predictor
from mapnet_tune.retrain import RetrainRequest, decide_champion, plan, retrain_best
from mapnet_tune.retrain.selection import Standing
from mapnet_tune.tracking import Tracker
from tests.conftest import (
    REGISTERED_STUDY,
    TINY_STUDY,
    drive_root,
    write_drive,
    write_folder,
    write_study,
)

MODEL = "mapnet-synthetic"


def _client() -> MlflowClient:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(uri, uri)


def _versions() -> list:
    return sorted(_client().search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))


def _aliases() -> dict[str, str]:
    return {a: str(v) for a, v in _client().get_registered_model(MODEL).aliases.items()}


def _runs(role: str) -> list:
    client = _client()
    experiment = client.get_experiment_by_name(REGISTERED_STUDY)
    return [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if r.data.tags.get("mapnet_tune.role") == role
    ]


def _set_champion_metric(value: str) -> str:
    champion = _aliases()["champion"]
    _client().set_model_version_tag(MODEL, champion, "metric.val/iou", value)
    return champion


@pytest.mark.slow
def test_versions_carry_tags_artifacts_and_aliases(registry):
    versions = _versions()
    assert [str(v.version) for v in versions] == ["1", "2"]
    study = optuna.load_study(study_name=REGISTERED_STUDY, storage="sqlite:///optuna.db")
    best = sorted(
        study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)),
        key=lambda t: t.value,
        reverse=True,
    )[:2]
    assert [v.tags["trial"] for v in versions] == [str(t.number) for t in best]
    for version, trial in zip(versions, best, strict=True):
        tags = version.tags
        assert tags["study"] == REGISTERED_STUDY and tags["dataset"] == "synthetic"
        assert len(tags["dataset.fingerprint"]) == 16
        assert float(tags["param.lr"]) == pytest.approx(trial.params["lr"])
        # Chosen on validation; the single test score is stored apart and decides nothing.
        assert {
            "metric.val/iou",
            "metric.test/iou",
            "metric.test/f1",
            "metric.test/auc",
            "metric.test/legacy_js",
        } <= set(tags)
        assert tags["selection_metric"] == "val/iou" and tags["trained_on"] == "train"
        assert tags["test_scored"] == "yes" and tags["recipe"] == "default"
        assert tags["train_resolution"] == "32x32 whole images"
        assert tags["evaluation"] == "full-image" and "final weights" in tags["weights"]
        assert '"size": 32' in tags["preprocessing"]
        description = _client().get_model_version(MODEL, version.version).description
        assert "Chosen by `val/iou`" in description and "decides nothing" in description
        assert f"--model models:/{MODEL}/{version.version}" in description
        run = _client().get_run(version.run_id)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"synthetic-retrain-t{trial.number:04d}"
        assert run.data.params["batch_size"] == "4"
        assert run.data.metrics["test/iou"] == pytest.approx(float(tags["metric.test/iou"]))
        assert run.data.metrics["val/iou"] == pytest.approx(float(tags["metric.val/iou"]))
        # The validation curve: every val_every (2) epochs and after the last.
        curve = _client().get_metric_history(version.run_id, "val/iou")
        # (the point linked to the logged model repeats the last one, at its step)
        assert sorted({m.step for m in curve}) == [1]
        # The version is the logged pyfunc model, whose page shows the selection and test
        # numbers; its run keeps no checkpoint.
        assert tags["mapnet_tune.model_format"] == "pyfunc-1"
        assert version.source.startswith("models:/m-")
        logged = _client().get_logged_model(version.source.removeprefix("models:/"))
        linked = {m.key: m.value for m in logged.metrics}
        assert linked["val/iou"] == pytest.approx(float(tags["metric.val/iou"]))
        assert linked["test/iou"] == pytest.approx(float(tags["metric.test/iou"]))
        assert not _client().list_artifacts(version.run_id, "checkpoint")
    parent = _runs("retrain")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in _runs("retrain-trial")} == {
        parent[0].info.run_id
    }

    # challenger is the newest version; champion the better one on val, the first on a tie.
    values = [float(v.tags["metric.val/iou"]) for v in versions]
    assert _aliases() == {"challenger": "2", "champion": "2" if values[1] > values[0] else "1"}

    # The registered model carries its card, written before test was looked at.
    predictor, _ = load_predictor(f"models:/{MODEL}/1", device="cpu")
    card = predictor.card
    assert card.trial == int(versions[0].tags["trial"])
    assert card.evaluation.protocol == "full-image" and card.preprocessing["size"] == 32
    assert card.test == {} and "metric.test/iou" in versions[0].tags
    assert card.selection_metric == "val/iou" and card.folds == 0


@pytest.mark.slow
def test_rerun_registers_nothing_and_force_registers_again(registry, cli):
    result = cli("retrain-best", "--study", REGISTERED_STUDY, "--top-k", 2)
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped: already registered") == 2
    assert "pass --force" in result.output and "nothing to retrain" in result.output
    assert len(_versions()) == 2 and len(_runs("retrain")) == 1

    result = cli("retrain-best", "--top-k", 1, "--force")  # the only study is the default
    assert result.exit_code == 0, result.output
    versions = _versions()
    assert len(versions) == 3 and versions[2].tags["trial"] == versions[0].tags["trial"]
    assert _aliases()["challenger"] == "3"
    # Retraining is seeded: the same trial reproduces its scores, and a tie keeps the
    # champion where it was.
    assert versions[2].tags["metric.val/iou"] == versions[0].tags["metric.val/iou"]
    assert versions[2].tags["metric.test/iou"] == versions[0].tags["metric.test/iou"]


@pytest.mark.slow
def test_champion_gate_in_both_directions(registry, cli):
    held = _set_champion_metric("1.0")
    result = cli("retrain-best", "--top-k", 1, "--force")
    assert result.exit_code == 0, result.output
    assert f"champion stays version {held} (val/iou 1.0000 >= " in result.output
    assert _aliases() == {"champion": held, "challenger": "3"}

    _set_champion_metric("-1.0")
    result = cli("retrain-best", "--top-k", 1, "--force")
    assert result.exit_code == 0, result.output
    assert re.search(
        rf"champion moves to version 4 \(val/iou \S+ > -1.0000 of version "
        rf"{held}\)",
        result.output,
    )
    assert _aliases() == {"champion": "4", "challenger": "4"}


def test_decide_champion_explains_itself():
    champion = Standing("2", 0.3)
    assert decide_champion(Standing("1", 0.5), None, "val/loss", False) == (
        True,
        "champion moves to version 1 (the first champion; val/loss 0.5000)",
    )
    moves, why = decide_champion(Standing("3", 0.2), champion, "val/loss", maximize=False)
    assert moves and why.startswith(
        "champion moves to version 3 (val/loss 0.2000 < 0.3000 of version 2) by the val-split "
        "rule: no folds to measure noise"
    )
    moves, why = decide_champion(Standing("3", 0.3), champion, "val/loss", maximize=False)
    assert not moves and "stays version 2 (val/loss 0.3000 <= 0.3000 of version 3)" in why
    assert decide_champion(Standing("3", math.nan), champion, "val/loss", False)[0] is False
    # A champion without the metric is not overtaken blindly.
    moves, why = decide_champion(Standing("3", 0.9), Standing("2", math.nan), "val/iou", True)
    assert not moves and "it has no val/iou to compare with" in why


def test_the_gate_needs_a_paired_margin_larger_than_its_standard_error():
    held = Standing("2", 0.80, (0.78, 0.80, 0.82))
    metric = "cv/val/iou_mean"
    # Better on every fold by about 0.01: the differences barely vary, so that is signal.
    clear = Standing("3", 0.81, (0.79, 0.811, 0.83))
    moves, why = decide_champion(clear, held, metric, maximize=True)
    assert moves and why.startswith("champion moves to version 3 (paired val/iou difference +0.")
    # A higher mean from one lucky fold is within the noise of the paired differences.
    lucky = Standing("3", 0.8133, (0.76, 0.80, 0.88))
    moves, why = decide_champion(lucky, held, metric, maximize=True)
    assert not moves and why.startswith("tie within CV noise: champion stays version 2")
    diffs = np.array([-0.02, 0.0, 0.06])
    assert f"difference {diffs.mean():+.4f}, standard error {diffs.std(ddof=1) / 3**0.5:.4f}" in why
    worse = Standing("3", 0.70, (0.68, 0.70, 0.72))
    moves, why = decide_champion(worse, held, metric, maximize=True)
    assert not moves and "version 3 is worse" in why
    # The same candidate retrained reproduces its folds: a tie, not a move.
    assert decide_champion(Standing("3", 0.80, held.folds), held, metric, True)[0] is False


@pytest.mark.slow
def test_folds_report_mean_and_spread_and_register_the_best_mean(registry, cli):
    champion_before = _aliases()["champion"]
    result = cli("retrain-best", "--top-k", 2, "--folds", 2, "--force")
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^t\d{4}: cv/val/iou_mean \S+ \+- \S+$", result.output, re.M)
    assert len(rows) == 2  # and the champion's re-run, marked as such
    assert "chosen by cv/val/iou_mean: t" in result.output
    versions = _versions()
    assert len(versions) == 3
    new = versions[2].tags
    assert {"metric.cv/val/iou_mean", "metric.cv/val/iou_std", "metric.test/iou"} <= set(new)
    assert new["trained_on"] == "train+val" and new["selection_metric"] == "cv/val/iou_mean"
    assert new["folds"] == "2"
    # The champion was chosen on the val split, another selection digest: its candidate is
    # cross-validated again on the same folds before the gate compares.
    assert "the selection digest differs from version" in result.output
    assert "re-run on the current folds" in result.output
    (rerun,) = _runs("retrain-champion")
    assert rerun.data.tags["optuna.trial"] == versions[int(champion_before) - 1].tags["trial"]
    folds = _runs("retrain-fold")
    assert len(folds) == 6 and all(r.info.status == "FINISHED" for r in folds)
    held_out = {r.data.params["held_out"] for r in folds}
    assert len(held_out) == 2  # the same two folds for both configurations and the champion
    assert sum(len(h.split(",")) for h in held_out) == 12  # train 8 + val 4, each once
    # Each fold logs its held-out curve with the recipe's own settings.
    fold = folds[0]
    assert [m.step for m in _client().get_metric_history(fold.info.run_id, "val/iou")] == [1]

    # The top two were compared already: a rerun neither cross-validates nor registers.
    again = cli("retrain-best", "--top-k", 3, "--folds", 2)
    assert again.exit_code == 0, again.output
    assert "not cross-validated again" in again.output and "nothing to retrain" in again.output
    assert len(_versions()) == 3


@pytest.mark.slow
def test_evaluate_a_registered_model_reproduces_the_logged_metrics(registry, cli):
    for uri in (f"models:/{MODEL}@champion", f"models:/{MODEL}/2"):
        result = cli("evaluate", "--model", uri, "--dataset", "synthetic", "--split", "test")
        assert result.exit_code == 0, result.output
        version = Tracker().resolve_model(uri)
        row = result.output.strip().splitlines()[-1].split()
        assert row[-2] == f"{float(version.tags['metric.test/iou']):.4f}"
        assert row[0] == f"{float(version.tags['metric.test/f1']):.4f}"
        assert row[4] == f"{float(version.tags['metric.test/auc']):.4f}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "args", "needle"),
    [
        (None, ("--study", "nope"), "no study 'nope'"),
        ("empty", ("--study", "empty"), "study 'empty' has no completed trial (no trials at all)"),
        ("pruned", ("--study", "pruned"), "has no completed trial (1 pruned)"),
        (None, (), "holds 3 studies; pass --study NAME"),  # with the two extra studies
        (
            "config",
            ("--study", REGISTERED_STUDY, "--config", "other.yaml"),
            "differs from the settings study 'tiny' was searched with",
        ),
    ],
)
def test_bad_retrain_input_is_one_line_and_creates_nothing(
    registry, registered_root, cli, setup, args, needle
):
    storage = "sqlite:///optuna.db"
    optuna.create_study(study_name="empty", storage=storage)
    pruned = optuna.create_study(study_name="pruned", storage=storage)
    pruned.tell(pruned.ask(), state=optuna.trial.TrialState.PRUNED)
    if setup == "config":
        registry.joinpath("other.yaml").write_text(
            (registered_root / "tiny.yaml").read_text().replace("width: 0.0625", "width: 0.125")
        )
    runs = len(_client().search_runs([e.experiment_id for e in _client().search_experiments()]))
    result = cli("retrain-best", *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    after = len(_client().search_runs([e.experiment_id for e in _client().search_experiments()]))
    assert after == runs and len(_versions()) == 2


@pytest.mark.slow
def test_failed_registration_leaves_no_version(registry, monkeypatch):
    def broken(self, name, alias, version):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(Tracker, "set_alias", broken)
    with pytest.raises(RuntimeError, match="registry went away"):
        retrain_best(RetrainRequest(study_name=REGISTERED_STUDY, top_k=1, force=True))
    assert [str(v.version) for v in _versions()] == ["1", "2"]
    failed = [r for r in _runs("retrain-trial") if r.info.status == "FAILED"]
    assert (
        len(failed) == 1 and "registry went away" in failed[0].data.tags["mapnet_tune.end_reason"]
    )


def test_retrain_section_is_validated_and_not_part_of_the_digest():
    base = {"dataset": {"name": "synthetic"}}
    for section, needle in [
        ({"eval_protocol": "patches"}, "valid values: full-image"),
        ({"batch_scale": 0}, "retrain.batch_scale' must be positive"),
        ({"patch_size": 256}, "retrain.patch_size' is not a known"),
        ({"resolution": "native"}, "'retrain.resolution' is 'native'; valid values: full, crop"),
        ({"folds": 1}, "retrain.folds' must be 0 (decide on the val split) or at least 2"),
        ({"val_every": 0}, "retrain.val_every' must be positive"),
        ({"variants": {"big": {"epochs": 0}}}, "retrain.variants.big.epochs' must be positive"),
        ({"variants": {"big": {"folds": 2}}}, "retrain.variants.big.folds' is not a known"),
        (
            {"resolution": "full", "eval_protocol": "sliding-window"},
            "resolution full predicts whole images",
        ),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            parse_study({**base, "retrain": section}, "s.yaml")
    one = parse_study({**base, "retrain": {"epochs": 3}}, "s.yaml")
    assert one.digest() == parse_study({**base, "retrain": {"epochs": 9}}, "s.yaml").digest()
    default = one.retrain.recipes["default"]
    assert default.batch_scale == 1.0 and default.resolution == "full"
    assert default.protocol == "full-image" and one.retrain.folds == 0
    # A variant is the default recipe with its own keys over it.
    two = parse_study(
        {**base, "retrain": {"epochs": 3, "variants": {"crop": {"resolution": "crop"}}}}, "s.yaml"
    )
    crop = two.retrain.recipes["crop"]
    assert crop.epochs == 3 and crop.protocol == "sliding-window"


def test_concat_and_take_keep_patches_on_their_images():
    rng = np.random.default_rng(0)

    def split(n: int, tag: str) -> Split:
        images = rng.random((n, 1, 8, 8), dtype=np.float32)
        patches = np.array([[i, r, r] for i in range(n) for r in (0, 2)], np.int32)
        return Split(
            images,
            (images > 0.5).astype(np.uint8),
            None,
            tuple(f"{tag}{i}" for i in range(n)),
            patches,
            4,
        )

    a, b = split(3, "a"), split(2, "b")
    merged = concat([a, b])
    assert merged.names == ("a0", "a1", "a2", "b0", "b1") and len(merged.patches) == 10
    assert merged.patches[6].tolist() == [3, 0, 0]
    part = take(merged, np.array([1, 4]))
    assert part.names == ("a1", "b1") and part.patch_size == 4
    assert part.patches.tolist() == [[0, 0, 0], [0, 2, 2], [1, 0, 0], [1, 2, 2]]
    np.testing.assert_array_equal(part.images[1], b.images[1])
    assert take(merged, slice(0, 2)).patches[:, 0].tolist() == [0, 0, 1, 1]


def test_fit_without_validation_keeps_the_final_weights(tmp_path):
    options = TINY_STUDY["dataset"]["options"]
    train = prepare("synthetic", None, options, cache_dir=tmp_path).splits["train"]
    model = MAPNet(in_channels=3, width=0.0625)
    settings = engine.TrainSettings(epochs=1, batch_size=4, lr=1e-3)
    result = engine.fit(model, train, None, settings, device=torch.device("cpu"))
    assert result.best_epoch == -1
    assert list(result.history[0]) == ["train/loss", "time/epoch_end_s"]


@pytest.mark.slow
def test_without_a_test_split_selection_is_on_validation_and_said_so(workdir, cli, monkeypatch):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_folder(workdir / "cases", count=10)
    study = write_study(
        workdir / "folder.yaml",
        dataset={
            "name": "folder",
            "source": str(workdir / "cases"),
            "options": {"val_fraction": 0.3},
        },
    )
    assert cli("search", "--config", study, "--trials", 2, "--study", "f").exit_code == 0
    result = cli("retrain-best", "--study", "f", "--top-k", 1)
    assert result.exit_code == 0, result.output
    assert "the dataset has no test split here" in result.output
    assert "decided on val/iou from the val split, with models trained on train only" in (
        result.output
    )
    client = MlflowClient(uri, uri)
    (version,) = client.search_model_versions("name='mapnet-folder'")
    assert version.tags["selection_metric"] == "val/iou" and version.tags["trained_on"] == "train"
    assert "metric.val/iou" in version.tags and "metric.test/iou" not in version.tags
    assert version.tags["test_scored"] == "no"

    result = cli("retrain-best", "--study", "f", "--top-k", 1, "--folds", 2, "--force")
    assert result.exit_code == 0, result.output
    assert "decided on cv/val/iou_mean from the 2-fold cross-validated mean" in result.output
    newest = max(client.search_model_versions("name='mapnet-folder'"), key=lambda v: int(v.version))
    assert newest.tags["trained_on"] == "train+val"
    assert newest.tags["selection_metric"] == "cv/val/iou_mean"
    assert "metric.val/iou" not in newest.tags  # a CV mean is not a val-split number


@pytest.mark.slow
def test_recipes_are_compared_by_the_same_folds_in_one_command(workdir, cli, monkeypatch):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    root = write_drive(workdir / "DRIVE", ids=range(21, 27), size=(40, 36))
    study = write_study(
        workdir / "drive.yaml",
        dataset={
            "name": "drive",
            "source": str(root),
            "options": {"input_mode": "rgb", "patch_size": 16, "patches_per_image": 20},
        },
        train={"epochs": 1, "eval_protocol": "sliding-window", "eval_stride": 8},
        search_space={"batch_size": {"choices": [8]}},
        retrain={
            "folds": 2,
            "epochs": 1,
            "batch_scale": 0.25,
            "variants": {
                "crop32": {
                    "resolution": "crop",
                    "dataset_options": {"patch_size": 32, "patches_per_image": 5},
                    "eval_stride": 8,
                }
            },
        },
    )
    assert cli("search", "--config", study, "--trials", 1, "--study", "d").exit_code == 0
    result = cli("retrain-best", "--recipe", "default,crop32")
    assert result.exit_code == 0, result.output
    assert re.search(r"t0000: cv/val/iou_mean \S+ \+- \S+", result.output)
    assert re.search(r"t0000-crop32: cv/val/iou_mean \S+ \+- \S+", result.output)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name("d")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    folds = [r for r in runs if r.data.tags.get("mapnet_tune.role") == "retrain-fold"]
    by_recipe = {}
    for run in folds:
        by_recipe.setdefault(run.data.tags["mapnet_tune.recipe"], set()).add(
            run.data.params["held_out"]
        )
    # Both recipes are scored on the same held-out images.
    assert set(by_recipe) == {"default", "crop32"} and by_recipe["default"] == by_recipe["crop32"]
    (version,) = client.search_model_versions("name='mapnet-drive'")
    tags = version.tags
    if tags["recipe"] == "crop32":
        assert tags["train_resolution"] == "32x32 patches" and tags["batch_size"] == "2"
        assert tags["evaluation"] == "sliding-window 32 px, stride 8"
    else:
        assert tags["train_resolution"] == "40x36 whole images"
        assert tags["evaluation"] == "full-image"
    assert tags["trained_on"] == "train+val"

    image = root / "training" / "images" / "21_training.tif"
    result = cli("predict", "--model", "models:/mapnet-drive@champion", image, "--out", "p")
    assert result.exit_code == 0, result.output
    assert Image.open(workdir / "p" / "21_training_mask.png").size == (36, 40)

    unknown = cli("retrain-best", "--recipe", "crop64", "--force")
    assert unknown.exit_code == 2 and "--recipe crop64 is not a recipe of" in unknown.output


@pytest.mark.slow
def test_changing_only_the_test_labels_changes_nothing_but_the_test_score(
    folds_root, tmp_path, cli, monkeypatch
):
    """Two retrains from the same registry, one with every test label inverted.

    The registry holds a champion chosen by 2-fold CV, so the gate compares the new version
    with it fold by fold on the same selection digest.
    """
    real_prepare = plan.prepare

    def inverted_test(*args, **kwargs):
        data = real_prepare(*args, **kwargs)
        test = data.splits["test"]
        flipped = dataclasses.replace(test, masks=(1 - test.masks).astype(np.uint8))
        return dataclasses.replace(data, splits={**data.splits, "test": flipped})

    monkeypatch.setenv("MAPNET_TUNE_CACHE", str(folds_root / "cache"))
    monkeypatch.delenv("MAPNET_TUNE_STORAGE", raising=False)
    seen = []
    for folder, patch in (("plain", False), ("inverted", True)):
        here = tmp_path / folder
        here.mkdir()
        for name in ("optuna.db", "mlflow.db"):
            shutil.copy(folds_root / name, here / name)
        monkeypatch.chdir(here)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{here / 'mlflow.db'}")
        if patch:
            monkeypatch.setattr(plan, "prepare", inverted_test)
        result = cli("retrain-best", "--top-k", 2, "--folds", 2, "--force")
        assert result.exit_code == 0, result.output
        newest = _versions()[-1]
        predictor, _ = load_predictor(f"models:/{MODEL}/{newest.version}", device="cpu")
        card = predictor.card
        weights = b"".join(t.numpy().tobytes() for t in predictor.model.state_dict().values())
        seen.append(
            {
                "decisions": [
                    line
                    for line in result.output.splitlines()
                    if "cv/val/iou_mean" in line or "registered as" in line
                ],
                "state_dict": hashlib.sha256(weights).hexdigest(),
                "tags": {k: v for k, v in newest.tags.items() if not k.startswith("metric.test/")},
                "card": {k: v for k, v in card.to_dict().items() if k != "test"},
                "aliases": _aliases(),
                "test": newest.tags["metric.test/iou"],
            }
        )
    plain, inverted = seen
    # The gate compared on the same digest, fold by fold.
    assert any("paired val/iou difference" in line for line in plain["decisions"])
    # Every decision, the registered weights, every tag but the test metrics, the card less
    # its test block and the aliases are the same ...
    for key in ("decisions", "state_dict", "tags", "card", "aliases"):
        assert plain[key] == inverted[key], key
    # ... while the test score, stored apart, did see the inverted labels.
    assert plain["test"] != inverted["test"]


def test_the_shipped_drive_study_cross_validates_full_resolution_by_default():
    drive = load_study(STUDIES_DIR / "drive.yaml")
    assert drive.retrain.folds == 5
    default = drive.retrain.recipes["default"]
    assert default.resolution == "full" and default.protocol == "full-image"
    crop = drive.retrain.recipes["crop256"]
    assert crop.resolution == "crop" and crop.eval_stride == 64
    assert crop.test_stride == 5  # the registered crop model is scored on test as published
    isic = load_study(STUDIES_DIR / "isic.yaml")
    assert isic.retrain.recipes["default"].resolution == "full"


@pytest.mark.slow
@pytest.mark.drive
def test_drive_retrains_whole_584x565_images_by_5_fold_cv(workdir, cli, monkeypatch):
    root = drive_root()
    if root is None:
        pytest.skip("MAPNET_TUNE_DRIVE_ROOT is not set")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # The shipped study, shrunk: a tiny model, few patches, one epoch; its retrain section
    # keeps the shipped folds (5) and resolution (full).
    shipped = yaml.safe_load((STUDIES_DIR / "drive.yaml").read_text())
    shipped["dataset"]["source"] = str(root)
    shipped["dataset"]["options"].update(patches_per_image=4)
    shipped["model"].update(width=0.0625)
    shipped["train"] = {"epochs": 1, "eval_protocol": "full-image", "eval_batch_size": 2}
    shipped["search_space"] = {"batch_size": {"choices": [64]}}
    shipped["retrain"].update(epochs=1, val_every=1, eval_batch_size=2)
    study = workdir / "drive.yaml"
    study.write_text(yaml.safe_dump(shipped))
    assert cli("search", "--config", study, "--trials", 1, "--study", "d").exit_code == 0
    result = cli("retrain-best")
    assert result.exit_code == 0, result.output
    assert "5-fold cross-validated mean" in result.output
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name("d")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    folds = [r for r in runs if r.data.tags.get("mapnet_tune.role") == "retrain-fold"]
    assert len(folds) == 5
    held = [r.data.params["held_out"].split(",") for r in folds]
    assert sorted(n for h in held for n in h) == [f"{i}_training" for i in range(21, 41)]
    (version,) = client.search_model_versions("name='mapnet-drive'")
    assert version.tags["train_resolution"] == "584x565 whole images"
    assert version.tags["evaluation"] == "full-image"
    assert version.tags["selection_metric"] == "cv/val/iou_mean"

    image = root / "training" / "images" / "21_training.tif"
    result = cli("predict", "--model", "models:/mapnet-drive@champion", image, "--out", "p")
    assert result.exit_code == 0, result.output
    assert Image.open(workdir / "p" / "21_training_mask.png").size == (565, 584)


@pytest.mark.slow
def test_status_shows_each_version_with_its_validation_and_its_single_test_score(registry, cli):
    result = cli("status", "--study", REGISTERED_STUDY)
    assert result.exit_code == 0, result.output
    assert "registered mapnet-synthetic (decided on validation; test scored once):" in (
        result.output
    )
    for version in _versions():
        tags = version.tags
        assert re.search(
            rf"mapnet-synthetic version {version.version}\b.*: trial {tags['trial']}, "
            rf"recipe default, val/iou {float(tags['metric.val/iou']):.4f}, "
            rf"test/iou {float(tags['metric.test/iou']):.4f}",
            result.output,
        )
