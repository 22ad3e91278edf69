"""Shared fixtures: a shrunken study (narrow model, tiny images) and a CLI runner."""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import cv2
import numpy as np
import optuna
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from mapnet_tune import checkpoint
from mapnet_tune.cli import main
from mapnet_tune.data import get_loader
from mapnet_tune.engine import Evaluation
from mapnet_tune.modelcard import ModelCard
from mapnet_tune.storage import open_storage

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


def parse_command(command: click.Command, name: str, args: list[str]) -> dict:
    """Parse ``args`` as the real command line would, without running it."""
    return command.make_context(name, list(args)).params


def interpolate_compose(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, innermost first."""
    pattern = re.compile(r"\$\{(\w+)(?:(:?[-?])([^${}]*))?\}")

    def value(m: re.Match) -> str:
        name, op, arg = m.groups()
        found = env.get(name)
        if op in (":-", ":?") and not found or op in ("-", "?") and found is None:
            if op and op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg or ""
        return found or ""

    while pattern.search(text):
        text = pattern.sub(value, text)
    return text


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


def rename_cases(root: Path, rename: Callable[[str, int], str]) -> None:
    """Rename each case's image and mask in a :func:`write_folder` tree to
    ``rename(stem, case number)``, e.g. to put a patient in the name."""
    for folder in ("images", "masks"):
        for path in (root / folder).iterdir():
            path.rename(path.with_name(rename(path.stem, int(path.stem.removeprefix("case")))))


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


def _search_and_retrain(root: Path, *retrain: object) -> Path:
    """Search the tiny study (3 trials) in ``root``, then ``retrain-best`` it with ``retrain``."""
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        _isolate(patch, root, root / "cache")
        _own_tracking_store(patch, root)
        study = write_study(root / "tiny.yaml")
        for args in (
            ("search", "--config", study, "--trials", 3, "--study", REGISTERED_STUDY),
            ("retrain-best", "--study", REGISTERED_STUDY, *retrain),
        ):
            result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="session")
def registered_root(tmp_path_factory):
    """A folder where the tiny study was searched (3 trials) and its top 2 retrained.

    Tests must not change it: use ``registry`` for a private copy of the stores.
    """
    return _search_and_retrain(tmp_path_factory.mktemp("registered"), "--top-k", 2)


@pytest.fixture(scope="session")
def folds_root(tmp_path_factory):
    """A folder where the tiny study was searched (3 trials) and its best trial registered by
    2-fold cross-validation: a champion with per-fold values that a later retrain compares
    with on the same selection digest. Tests must not change it; copy its databases."""
    return _search_and_retrain(tmp_path_factory.mktemp("folds"), "--top-k", 1, "--folds", 2)


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


# Real servers for the tests of several workers: fresh PostgreSQL databases and a real
# ``mlflow server`` process (test_scaleout, test_slurm).


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except optuna.exceptions.StorageInternalError:
            found = None  # the polling raced a worker creating Optuna's tables
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def new_database() -> Iterator[Callable[[str], str]]:
    """Make fresh PostgreSQL databases for a module (dropped at its end); returns URLs."""
    import psycopg2
    import sqlalchemy

    url = os.environ.get("MAPNET_TUNE_POSTGRES_URL")
    if not url:
        pytest.skip("set MAPNET_TUNE_POSTGRES_URL to a PostgreSQL server (as .ci/run does)")
    admin = sqlalchemy.make_url(url)
    conn = psycopg2.connect(
        host=admin.host,
        port=admin.port,
        user=admin.username,
        password=admin.password,
        dbname=admin.database,
    )
    conn.autocommit = True
    suffix = secrets.token_hex(4)
    made: list[str] = []

    def create(role: str) -> str:
        name = f"mapnet_tune_test_{role}_{suffix}"
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return admin.set(database=name).render_as_string(hide_password=False)

    yield create
    with conn.cursor() as cur:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


class MlflowServer:
    """``mlflow server`` on a free local port, with the given backend store; restartable."""

    def __init__(self, backend: str, root: Path) -> None:
        self.backend, self.root, self.port = backend, root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until it answers its health check."""
        cmd = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            str(self.root / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.root / "mlflow-server.log", "ab")  # noqa: SIM115 (the server keeps it)
        # Its own session, so that stop() reaches the web workers it forks.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        until(self._healthy, 120, "the MLflow server to start")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError((self.root / "mlflow-server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and the processes it started."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(new_database, tmp_path_factory) -> Iterator[tuple[str, MlflowServer]]:
    """(Optuna storage URL, running MLflow server), shared by the tests of a module."""
    server = MlflowServer(new_database("mlflow"), tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield new_database("optuna"), server
    server.stop()


@functools.cache
def polled_storage(url: str) -> optuna.storages.BaseStorage:
    """One storage per URL for all polling: a fresh one per look would open a connection pool
    each time (five looks a second) and run the server out of connections."""
    return open_storage(url, heartbeat=False)


def polled_study(storage: str, name: str) -> optuna.Study:
    """The study ``name`` in ``storage``, as the tests poll it."""
    return optuna.load_study(study_name=name, storage=polled_storage(storage))


def mid_training(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials that are mid-training: running, with their MLflow run and an epoch reported."""
    if name not in optuna.get_all_study_names(polled_storage(storage)):
        return []
    running = polled_study(storage, name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    return [t for t in running if "mlflow_run_id" in t.user_attrs and t.intermediate_values]


def running_trial(storage: str, name: str) -> optuna.trial.FrozenTrial | None:
    """A trial that is mid-training, if any."""
    return next(iter(mid_training(storage, name)), None)


def study_runs(client, study: str) -> tuple[list, list]:
    """(parent runs, trial runs) of a study's MLflow experiment; ``client`` an MlflowClient."""
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return (
        [r for r in runs if r.data.tags.get("mapnet_tune.role") == "study"],
        [r for r in runs if r.data.tags.get("mapnet_tune.role") == "trial"],
    )
