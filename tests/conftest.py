"""Shared fixtures: a shrunken study (narrow model, tiny images) and a CLI runner."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from mapnet_tune import checkpoint
from mapnet_tune.cli import main
from mapnet_tune.data import get_loader
from mapnet_tune.engine import Evaluation
from mapnet_tune.modelcard import ModelCard

TINY_STUDY = {
    "dataset": {
        "name": "synthetic",
        "options": {
            "size": 32,
            "channels": 3,
            "count": {"train": 8, "val": 4, "test": 4},
            "seed": 1,
        },
    },
    "model": {"width": 0.0625, "bn_momentum": 0.1},
    "train": {"epochs": 2, "eval_protocol": "full-image", "eval_batch_size": 8},
    "objective": {"metric": "val/iou", "direction": "maximize"},
    "sampler": {"name": "tpe", "seed": 3, "n_startup_trials": 2},
    "pruner": {"name": "none"},
    "search_space": {
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": {"choices": [4]},
        "pos_weight": {"low": 1.0, "high": 3.0},
        "flip_p": {"low": 0.0, "high": 0.5},
        "hue_shift": {"low": 0, "high": 10, "int": True},
    },
    "retrain": {"epochs": 2},
}


def write_study(path: Path, **overrides) -> Path:
    """Write the tiny study with top-level sections replaced or merged from ``overrides``."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_STUDY.items()}
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working directory holding the embedded stores, with no server env vars."""
    _isolate(monkeypatch, tmp_path, tmp_path / "cache")
    return tmp_path


@pytest.fixture
def cli():
    """Run ``mapnet-tune ARGS`` in-process; returns the click Result."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


def unavailable(component: str, why: str):
    """Skip a test whose real component cannot start here, saying why and how to get it.

    ``.ci/run`` sets ``MAPNET_TUNE_REQUIRE_COMPONENTS=1``: there the test fails instead, so a
    component that CI installs can never silently stop being tested.
    """
    message = f"{component} is not available: {why}"
    if os.environ.get("MAPNET_TUNE_REQUIRE_COMPONENTS") == "1":
        pytest.fail(message + " (MAPNET_TUNE_REQUIRE_COMPONENTS=1: CI must run this test)")
    pytest.skip(message)


def drive_root() -> Path | None:
    """The real DRIVE training set, when the environment provides it."""
    root = os.environ.get("MAPNET_TUNE_DRIVE_ROOT")
    return Path(root) if root else None


# Tiny datasets in the official layouts, for the data loader tests.


def save_image(path: Path, array) -> Path:
    """Write an array as an image file (int16 through OpenCV, which keeps negative values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == np.int16:
        assert cv2.imwrite(str(path), array)
    else:
        Image.fromarray(array).save(path)
    return path


def disk(height: int, width: int, radius: float):
    """A {0, 255} uint8 disk centred in an image."""
    y, x = np.mgrid[:height, :width]
    inside = (y - (height - 1) / 2) ** 2 + (x - (width - 1) / 2) ** 2 <= radius**2
    return (inside * 255).astype(np.uint8)


def write_drive(root: Path, ids=range(21, 24), kind: str = "training", size=(30, 26)) -> Path:
    """DRIVE layout: random RGB images, random vessel masks, a disk FOV."""
    rng = np.random.default_rng(0)
    for i in ids:
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        save_image(root / kind / "images" / f"{i}_{kind}.tif", rgb)
        manual = (rng.random(size) < 0.2).astype(np.uint8) * 255
        save_image(root / kind / "1st_manual" / f"{i}_manual1.gif", manual)
        save_image(root / kind / "mask" / f"{i}_{kind}_mask.gif", disk(*size, min(size) / 2.2))
    return root


def write_isic(root: Path, count: int = 7) -> Path:
    """ISIC layout: JPEG photographs of varying size, PNG masks with a lesion disk."""
    rng = np.random.default_rng(1)
    for i in range(count):
        h, w = 30 + i, 40 - i
        name = f"ISIC_{i:07d}"
        photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        save_image(root / "ISIC2018_Task1-2_Training_Input" / f"{name}.jpg", photo)
        save_image(
            root / "ISIC2018_Task1_Training_GroundTruth" / f"{name}_segmentation.png",
            disk(h, w, h / 3),
        )
    return root


def write_lung(
    root: Path, count: int = 10, hu: bool = True, size: int = 128, per_patient: int = 4
) -> Path:
    """Lung layout: a body ellipse with two lungs, in HU (int16) or 8-bit; lung masks 0/255."""
    y, x = np.mgrid[:size, :size] / size
    body = ((y - 0.5) / 0.42) ** 2 + ((x - 0.5) / 0.46) ** 2 <= 1
    lungs = ((y - 0.5) / 0.2) ** 2 + ((np.abs(x - 0.5) - 0.15) / 0.08) ** 2 <= 1
    values = np.where(lungs, -800, np.where(body, 40, -1000)).astype(np.int16)
    for i in range(count):
        name = f"ID_{i // per_patient:04d}_Z_{i:04d}.tif"
        noisy = values + np.int16(i)
        image = noisy if hu else ((noisy + 1024) / 2048 * 255).astype(np.uint8)
        save_image(root / "2d_images" / name, image)
        save_image(root / "2d_masks" / name, (lungs * 255).astype(np.uint8))
    return root


def write_folder(root: Path, count: int = 10, size=(20, 24), colour: bool = True) -> Path:
    """images/ and masks/ with matching stems: PNG photographs, 0/255 PNG masks."""
    rng = np.random.default_rng(2)
    for i in range(count):
        shape = (*size, 3) if colour else size
        save_image(root / "images" / f"case{i:02d}.png", rng.integers(0, 256, shape, np.uint8))
        save_image(root / "masks" / f"case{i:02d}.png", disk(*size, size[0] / 3))
    return root


def write_checkpoint(path: Path, model, data, **card) -> Path:
    """Save ``model`` as a checkpoint for the prepared dataset ``data``, scored on whole images.

    The only place tests create checkpoints: when the checkpoint format changes, only this
    helper follows it. ``card`` overrides fields of the model card.
    """
    options = {key: data.settings[key] for key in get_loader(data.name).options}
    fields = {
        "dataset": data.name,
        "fingerprint": data.fingerprint,
        "dataset_options": options,
        "preprocessing": data.settings,
        "study": "handmade",
        "trial": 0,
        "recipe": "default",
        "params": {"lr": 1e-3, "batch_size": 2},
        "batch_size": 2,
        "epochs": 1,
        "training": "{}x{} whole images".format(*data.splits["train"].images.shape[-2:]),
        "trained_on": "train",
        "weights": "the final weights",
        "evaluation": Evaluation("full-image", batch_size=2),
        "selection_metric": "val/iou",
        "selection_value": float("nan"),
        **card,
    }
    return checkpoint.save(path, model, ModelCard(**fields))


# One search and retrain-best shared by the registry, predict and report tests.

REGISTERED_STUDY = "tiny"


@pytest.fixture(scope="session")
def registered_root(tmp_path_factory):
    """A folder where the tiny study was searched (3 trials) and its top 2 retrained.

    Tests must not change it: use ``registry`` for a private copy of the stores.
    """
    root = tmp_path_factory.mktemp("registered")
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, root, root / "cache")
        _own_tracking_store(patch, root)
        study = write_study(root / "tiny.yaml")
        for args in (
            ("search", "--config", study, "--trials", 3, "--study", REGISTERED_STUDY),
            ("retrain-best", "--study", REGISTERED_STUDY, "--top-k", 2),
        ):
            result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def registry(registered_root, tmp_path, monkeypatch):
    """A working directory with private copies of the shared study and registry databases.

    New artifacts still land under the shared folder's ``mlruns``, in new run folders.
    """
    for name in ("optuna.db", "mlflow.db"):
        shutil.copy(registered_root / name, tmp_path / name)
    _isolate(monkeypatch, tmp_path, registered_root / "cache")
    _own_tracking_store(monkeypatch, tmp_path)
    return tmp_path


def _own_tracking_store(patch: pytest.MonkeyPatch, folder: Path) -> None:
    # MLflow keeps one database engine per tracking URI for the whole process, so a relative
    # sqlite:///mlflow.db would stay on the first folder that opened it; an absolute URI
    # keeps each test on its own copy.
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")


def _isolate(patch: pytest.MonkeyPatch, folder: Path, cache: Path) -> None:
    patch.chdir(folder)
    for var in ("MLFLOW_TRACKING_URI", "MAPNET_TUNE_STORAGE"):
        patch.delenv(var, raising=False)
    patch.setenv("MAPNET_TUNE_CACHE", str(cache))
