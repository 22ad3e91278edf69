"""The MLflow UI as the study's home, and the Optuna dashboard, served for real.

``mapnet-tune ui`` and ``mapnet-tune dashboard`` run as a user starts them; the browser test
opens the printed deep links in Debian's headless Chromium (Selenium with the system
chromedriver, nothing downloaded) and saves screenshots under the test's folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from mapnet_tune.names import RUN_ID_ATTR
from mapnet_tune.tracking import Tracker
from tests.conftest import REGISTERED_STUDY, unavailable, write_study

pytestmark = pytest.mark.slow

#: The console script without an activated environment, as a user would start it.
SCRIPT = Path(sys.executable).parent / "mapnet-tune"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(args: list[str], cwd: Path, probe: str, env: dict | None = None) -> Iterator[str]:
    """Start ``mapnet-tune ARGS`` and yield its output so far once ``probe`` answers."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), **(env or {})}
    log = cwd / f"{args[0]}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([SCRIPT, *args], cwd=cwd, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(probe, timeout=2) as response:
                    response.read()
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
        yield log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_ui_serves_the_embedded_store(workdir):
    # ./mlflow.db with one experiment. An absolute URI: MLflow caches one engine per URI
    # per process, so a relative one could still point at an earlier test's folder.
    Tracker(f"sqlite:///{workdir / 'mlflow.db'}").experiment("demo-study")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
    with _serving(["ui", "--port", str(port)], workdir, api) as output:
        body = _get_json(api)
    assert "demo-study" in [e["name"] for e in body["experiments"]]
    assert "workflowType=machine_learning" in output


def test_a_study_tells_its_story_in_mlflow(workdir, cli, monkeypatch):
    """The parent run, trial runs and experiment carry what the UI needs, the MLflow way."""
    # Absolute: MLflow keeps one engine per URI per process (see conftest._own_tracking_store).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    result = cli("search", "--config", write_study(workdir / "tiny.yaml"), "--trials", 6)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="synthetic-tiny", storage="sqlite:///optuna.db")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study.study_name)
    # The model-training view and the study's shared view, which the printed link names.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    packed = experiment.tags["mlflow.sharedViewState.mapnet-tune-study"]
    view = json.loads(zlib.decompress(base64.b64decode(packed.removeprefix("deflate;"))))
    assert view["orderByKey"] == "metrics.`val_best/iou`" and view["orderByAsc"] is False
    assert "metrics.`val_best/iou`" in view["selectedColumns"]
    link = f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    assert link + "&viewStateShareKey=mapnet-tune-study" in result.output
    # The parent: one `best` point per finished trial, never worse; counts; a note; plots.
    parent = study.user_attrs["mlflow_parent_run_id"]
    history = client.get_metric_history(parent, "best")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    values = [m.value for m in history]
    assert values == sorted(values) and values[-1] == pytest.approx(study.best_value)
    assert client.get_metric_history(parent, "trials/complete")[-1].value == 6
    run = client.get_run(parent)
    best_run = study.best_trial.user_attrs[RUN_ID_ATTR]
    assert f"t{study.best_trial.number:04d}" in run.data.tags["mlflow.note.content"]
    assert best_run in run.data.tags["mlflow.note.content"]
    assert experiment.tags["mapnet_tune.best_run"] == best_run
    plots = {f.path for f in client.list_artifacts(parent, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/param_importances.png"}
    fingerprint = run.data.tags["dataset.fingerprint"]
    # Every trial: its dataset input, its source, its summaries; no wall-clock "best".
    for trial in study.trials:
        trial_run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
        (data,) = trial_run.inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest) == ("synthetic", fingerprint)
        assert trial_run.data.tags["mlflow.source.name"] == "mapnet-tune search"
        assert re.fullmatch(
            r"[0-9a-f]{40}|unknown", trial_run.data.tags["mlflow.source.git.commit"]
        )
        metrics = trial_run.data.metrics
        assert metrics["val_best/iou"] == pytest.approx(trial.value)
        assert "val_final/iou" in metrics and "val/iou" in metrics
        assert not [k for k in metrics if k.startswith("best/")]


def test_progress_is_plain_lines_with_rate_and_eta_off_a_terminal(workdir, cli, monkeypatch):
    monkeypatch.setenv("MAPNET_TUNE_PROGRESS_S", "0")
    result = cli("search", "--config", write_study(workdir / "tiny.yaml"), "--trials", 2)
    assert result.exit_code == 0, result.output
    out = result.output
    if not _has_cuda():
        assert "training on the CPU with " in out and "no CUDA GPU is visible" in out
    assert re.search(r"t0000 epoch 1/2: 4/8 images \(50%\) \[.*image/s\]", out)
    assert re.search(r"t0000: about [\d:]+ per trial on (cpu|cuda)", out)
    # The second trial's lines estimate the time to the requested trials.
    assert re.search(r"\[1/2 done \| ETA [\d:]+ \|", out)


def test_a_long_cpu_trial_says_how_to_shrink_the_study(monkeypatch):
    import io

    import torch

    from mapnet_tune.study import progress

    clock = iter(range(0, 10_000, 20))  # every step of 32 patches takes 20 s
    monkeypatch.setattr(progress, "monotonic", lambda: next(clock))
    out = io.StringIO()
    shown = progress.Progress(optuna.create_study(), 50, "val/iou", stream=out)
    meter = shown.meter(3, epochs=40, unit="patch", device=torch.device("cpu"))
    for step in range(1, 4):
        meter(0, step, 5000, 32)
    text = out.getvalue()
    # 5000 steps x 40 epochs x 20 s, measured after the first step's warm-up.
    assert (
        "t0003: about 1111:06:40 per trial on cpu (40 epochs of 5000 steps at 1.6 patches/s" in text
    )
    assert "to shrink the study, train on a GPU" in text and "--config" in text
    assert "t0003 epoch 1/40: 96/160000 patches (0%)" in text


def test_a_bad_progress_interval_is_one_clear_error(workdir, cli, monkeypatch):
    monkeypatch.setenv("MAPNET_TUNE_PROGRESS_S", "often")
    result = cli("search", "--config", write_study(workdir / "tiny.yaml"), "--trials", 1)
    assert result.exit_code == 2
    assert "MAPNET_TUNE_PROGRESS_S='often' must be a number of seconds" in result.output


def test_dashboard_serves_the_study_storage(registry):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api/studies"
    with _serving(["dashboard", "--port", str(port)], registry, api) as output:
        studies = _get_json(api)["study_summaries"]
    assert [s["study_name"] for s in studies] == [REGISTERED_STUDY]
    assert "Optuna dashboard for sqlite:///optuna.db" in output


def test_dashboard_without_a_storage_is_one_clear_error(workdir, cli):
    result = cli("dashboard")
    assert result.exit_code == 2
    assert "no Optuna storage at sqlite:///optuna.db" in result.output


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _browser():
    """Headless Debian Chromium through its own chromedriver; skip (or fail in CI) without."""
    if not (shutil.which(CHROMEDRIVER) and Path(CHROMIUM).exists()):
        unavailable("Chromium", "install Debian's chromium and chromium-driver (apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=2200,1100")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{texts} not shown; the page shows:\n{body[:3000]}")


@pytest.mark.browser
def test_the_printed_deep_links_open_the_study_in_a_browser(registry, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/health"
    env = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    with _serving(["ui", "--port", str(port)], registry, api, env) as output:
        runs = re.search(r"study tiny: (\S+)", output).group(1)
        model = re.search(r"registered model: (\S+)", output).group(1)
        driver = _browser()
        try:
            # A fresh profile: the link alone gives the model-training view, the trials
            # flat and sorted, and their validation metrics as columns.
            driver.get(runs)
            body = _wait_for_text(driver, ["synthetic-t0000", "val_best/iou", "Model training"])
            driver.save_screenshot(str(tmp_path / "study-runs.png"))
            assert {"synthetic-t0000", "synthetic-t0001", "synthetic-t0002"} <= set(body.split())
            assert "Traces / Latency" not in body
            driver.get(model)
            _wait_for_text(driver, ["MAP-Net segmentation models for", "@champion"])
            driver.save_screenshot(str(tmp_path / "registered-model.png"))
            # The champion's logged model shows the numbers that chose it and its test score.
            client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
            champion = client.get_model_version_by_alias("mapnet-synthetic", "champion")
            model_id = champion.source.removeprefix("models:/")
            experiment = client.get_logged_model(model_id).experiment_id
            logged = f"{runs.split('#')[0]}#/experiments/{experiment}/models/{model_id}"
            driver.get(logged)
            _wait_for_text(driver, ["val/iou", "test/iou"])
            driver.save_screenshot(str(tmp_path / "logged-model.png"))
        finally:
            driver.quit()
    assert (tmp_path / "study-runs.png").stat().st_size > 10_000
