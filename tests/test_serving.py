"""The registered model as MLflow's own tools use it: pyfunc, `mlflow models serve|predict`."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from mapnet_tune import checkpoint
from mapnet_tune.data import prepare
from mapnet_tune.engine import Evaluation
from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet
from mapnet_tune.modelcard import ModelCard
from mapnet_tune.predictor import Predictor, load_folder, save_folder
from mapnet_tune.serving import decode_inputs
from tests.conftest import TINY_STUDY, free_port, until, write_checkpoint

CHAMPION = "models:/mapnet-synthetic@champion"


def _download(registry: Path) -> Path:
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(registry / "model")))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb_and_grey() -> list[np.ndarray]:
    """Two images of different sizes: an odd-sized RGB one and a grey one."""
    rng = np.random.default_rng(5)
    return [
        rng.integers(0, 256, (45, 37, 3), dtype=np.uint8),
        rng.integers(0, 256, (32, 50), dtype=np.uint8),
    ]


@pytest.mark.slow
def test_the_logged_model_holds_no_pickle_and_names_only_published_packages(registry):
    folder = _download(registry)
    for path in folder.rglob("*"):
        if path.is_file():
            assert b"pickle" not in path.read_bytes().lower(), path
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mapnet_tune.tracking.pyfunc"
    assert (folder / flavor["data"] / "weights.safetensors").is_file()
    assert (folder / "code" / "mapnet_tune" / "predictor.py").is_file()
    assert not list(folder.rglob("*.pyc"))
    requirements = (folder / "requirements.txt").read_text().split()
    assert not [r for r in requirements if "mapnet" in r]
    assert {r.split("==")[0] for r in requirements} >= {"torch", "numpy", "pillow", "mlflow"}
    # Dynamic dimensions, and an example that is a raw 8-bit image, not a model input.
    assert json.loads(mlmodel["signature"]["inputs"])[0]["tensor-spec"]["shape"] == [-1]
    outputs = json.loads(mlmodel["signature"]["outputs"])
    assert [(o["name"], o["tensor-spec"]["shape"]) for o in outputs] == [
        ("probability", [-1, -1]),
        ("mask", [-1, -1]),
    ]
    example = np.asarray(json.loads((folder / "input_example.json").read_text()))
    assert example.shape == (32, 32, 3) and example.min() >= 0 and example.max() > 1
    # The card is the logged model's metadata.
    assert mlmodel["metadata"]["model_card"]["dataset"] == "synthetic"

    served = mlflow.pyfunc.load_model(CHAMPION)
    out = served.predict(np.zeros((123, 97, 3), np.uint8))
    assert out["probability"].shape == out["mask"].shape == (123, 97)
    assert out["probability"].dtype == np.float32 and out["mask"].dtype == np.uint8
    assert served.predict(np.zeros((123, 97), np.uint8))["mask"].shape == (123, 97)


@pytest.mark.slow
def test_the_model_loads_and_predicts_where_mapnet_tune_cannot_be_imported(registry):
    folder = _download(registry)
    image = _rgb_and_grey()[0]
    np.save(registry / "image.npy", image)
    script = textwrap.dedent(
        f"""
        import importlib.util, json, os, sys
        # Hide every mapnet_tune on the path: the checkout and any installed copy.
        sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "mapnet_tune"))]
        assert importlib.util.find_spec("mapnet_tune") is None, "mapnet_tune is importable"
        import mlflow.pyfunc
        import numpy as np
        model = mlflow.pyfunc.load_model({str(folder)!r})
        out = model.predict(np.load({str(registry / "image.npy")!r}))
        import mapnet_tune
        np.save({str(registry / "prob.npy")!r}, out["probability"])
        print(json.dumps({{"code": mapnet_tune.__file__, "shape": out["mask"].shape}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=registry,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["shape"] == [45, 37]
    assert shown["code"].startswith(str(folder / "code" / "mapnet_tune"))
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    here = mlflow.pyfunc.load_model(CHAMPION).predict(image)["probability"]
    assert np.abs(np.load(registry / "prob.npy") - here).max() <= 1e-6


@pytest.mark.slow
def test_served_over_http_as_status_prints_it(registry, cli):
    status = cli("status", "--study", "tiny")
    assert status.exit_code == 0, status.output
    lines = status.output.splitlines()
    serve = next(line.strip() for line in lines if "models serve" in line)
    curl = next(line.strip() for line in lines if line.strip().startswith("curl"))
    port = free_port()
    serve = serve.replace("--port 5001", f"--port {port}")
    curl = curl.replace(":5001/", f":{port}/")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        ["bash", "-c", serve],
        cwd=registry,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(registry / "serve.log", "w"),  # noqa: SIM115 (closed with the process)
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: _get(f"{url}/ping") == 200 or server.poll() is not None, 120, "the server")
        assert server.poll() is None, (registry / "serve.log").read_text()[-3000:]
        images = _rgb_and_grey()
        for image, name in zip(images, ("rgb", "grey"), strict=True):
            Image.fromarray(image).save(registry / f"{name}.png")
        expected = [_predict_tiff(cli, registry, name) for name in ("rgb", "grey")]

        # Two images of different sizes in one request, as base64 PNG.
        body = {"inputs": [base64.b64encode(_png(im)).decode() for im in images]}
        status_code, answer = _post(f"{url}/invocations", body)
        assert status_code == 200, answer
        got = json.loads(answer)["predictions"]
        for item, (prob, mask) in zip(got, expected, strict=True):
            assert np.asarray(item["probability"]).shape == prob.shape
            assert np.abs(np.asarray(item["probability"]) - prob).max() <= 1e-6
            np.testing.assert_array_equal(np.asarray(item["mask"]) * 255, mask)

        # The printed curl line, as printed, on one image.
        shell = curl.replace("IMAGE.png", "rgb.png")
        out = subprocess.run(["bash", "-c", shell], cwd=registry, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        prob = np.asarray(json.loads(out.stdout)["predictions"][0]["probability"])
        assert np.abs(prob - expected[0][0]).max() <= 1e-6

        # Bad input: HTTP 400 with a one-line reason, never a 500 or a traceback.
        deep = io.BytesIO()
        Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(deep, format="TIFF")
        png = _png(images[0])
        cases = {
            b"hello, not an image": "not an image file",
            png[: len(png) // 2]: "truncated",
            _png(np.zeros((1, 1), np.uint8)): "is 1x1 pixels; this model needs at least 16x16",
            deep.getvalue(): "is uint16, but this synthetic model takes 8-bit images",
        }
        for payload, needle in cases.items():
            request = {"inputs": [base64.b64encode(payload).decode()]}
            code, answer = _post(f"{url}/invocations", request)
            assert code == 400, answer
            error = json.loads(answer)
            assert "stack_trace" not in error and "Traceback" not in answer
            reason = error["message"].splitlines()[-1]
            assert reason.startswith("Error: image 1 ") and needle in reason, reason
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # bash and the server it started
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_models_predict_gives_what_predict_writes(registry, cli):
    images = _rgb_and_grey()
    for image, name in zip(images, ("rgb", "grey"), strict=True):
        Image.fromarray(image).save(registry / f"{name}.png")
    expected = [_predict_tiff(cli, registry, name) for name in ("rgb", "grey")]
    body = {"inputs": [base64.b64encode(_png(im)).decode() for im in images]}
    (registry / "input.json").write_text(json.dumps(body))
    result = subprocess.run(
        [
            *(str(Path(sys.executable).with_name("mlflow")), "models", "predict"),
            *("-m", CHAMPION, "-i", "input.json", "-t", "json", "-o", "output.json"),
            *("--env-manager", "local"),
        ],
        cwd=registry,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((registry / "output.json").read_text())["predictions"]
    for item, (prob, mask) in zip(got, expected, strict=True):
        assert np.abs(np.asarray(item["probability"]) - prob).max() <= 1e-6
        np.testing.assert_array_equal(np.asarray(item["mask"]) * 255, mask)


@pytest.mark.slow
def test_a_version_registered_before_servable_models_still_predicts(registry, cli):
    """An old version: a checkpoint on its run, no pyfunc model; predict reads the checkpoint."""
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("mapnet-synthetic", "champion")
    experiment = client.get_run(champion.run_id).info.experiment_id
    run = client.create_run(experiment, run_name="old-style").info.run_id
    model, card = _handmade(registry)
    checkpoint.save(registry / "mapnet.pt", model, card)
    client.log_artifact(run, str(registry / "mapnet.pt"), "checkpoint")
    old = client.create_model_version(
        "mapnet-synthetic", f"runs:/{run}/checkpoint", run_id=run, tags={"trial": "0"}
    )
    Image.fromarray(_rgb_and_grey()[0]).save(registry / "rgb.png")
    ref = f"models:/mapnet-synthetic/{old.version}"
    result = cli("predict", "--model", ref, registry / "rgb.png", "--out", registry / "out")
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(registry / "out" / "rgb_prob.png")).shape == (45, 37)
    status = cli("status", "--study", "tiny")
    line = next(x for x in status.output.splitlines() if f"version {old.version}" in x)
    assert "not servable" in line and "retrain-best --force" in line
    servable = next(x for x in status.output.splitlines() if "(@challenger" in x)
    assert "not servable" not in servable


def _handmade(folder: Path) -> tuple[MAPNet, ModelCard]:
    """A narrow MAP-Net with random weights and the card of a tiny synthetic dataset."""
    data = prepare("synthetic", None, TINY_STUDY["dataset"]["options"])
    torch.manual_seed(1)
    model = MAPNet(in_channels=3, width=0.0625).eval()
    return model, checkpoint.load(write_checkpoint(folder / "handmade.pt", model, data))[1]


def test_a_model_folder_predicts_as_its_model_at_every_size(workdir):
    """The Predictor, rebuilt from its folder, against the model it was saved from."""
    model, card = _handmade(workdir)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 53), (64, 64)]]
    for evaluation in (Evaluation("full-image"), Evaluation("sliding-window", 32, 8, 4)):
        card = dataclasses.replace(card, evaluation=evaluation)
        folder = save_folder(workdir / evaluation.protocol, model, card)
        assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.safetensors"]
        # (JSON, since the handmade card's NaN selection value never equals itself)
        loaded = json.dumps(load_folder(folder)[1].to_dict(), sort_keys=True)
        assert loaded == json.dumps(card.to_dict(), sort_keys=True)
        direct = Predictor(model, card, "cpu").predict(images)
        rebuilt = Predictor.from_folder(folder, "cpu").predict(images)
        for a, b, image in zip(direct, rebuilt, images, strict=True):
            assert a.probability.shape == image.shape[:2]
            assert a.probability.std() > 0
            np.testing.assert_array_equal(a.probability, b.probability)
            np.testing.assert_array_equal(a.mask, (a.probability >= 0.5).astype(np.uint8))


def test_bad_images_get_one_line_that_names_them(workdir):
    predictor = Predictor(*_handmade(workdir), "cpu")
    cases = [
        (np.zeros((8, 40), np.uint8), "image 1 is 8x40 pixels; this model needs at least 16x16"),
        (np.zeros((20, 20, 5), np.uint8), "image 1 has shape (20, 20, 5)"),
        (np.zeros((20, 20), np.uint16), "image 1 is uint16, but this synthetic model takes 8-bit"),
    ]
    for image, needle in cases:
        with pytest.raises(UserError, match=re.escape(needle)):
            predictor.predict([image])


def test_requests_decode_into_images():
    rgb, grey = _rgb_and_grey()
    images, single = decode_inputs(rgb)
    assert single and np.array_equal(images[0], rgb)
    images, single = decode_inputs(np.array([base64.b64encode(_png(grey)).decode()], object))
    assert not single and np.array_equal(images[0], grey)
    images, single = decode_inputs(np.stack([rgb, rgb]))
    assert not single and len(images) == 2
    nested = np.array(grey.tolist(), dtype=object)  # pixel lists from JSON
    images, single = decode_inputs(nested)
    assert single and images[0].dtype == np.uint8 and np.array_equal(images[0], grey)
    for bad, needle in [
        ("not base64!", "is text but not base64"),
        (np.array([[300, 2]], dtype=object), "pixel values outside 0-255"),
        (3.5, "cannot read images from a float"),
        (np.array([], dtype=object), "holds no images"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            decode_inputs(bad)


def _predict_tiff(cli, registry: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 probabilities, 0/255 mask) that `mapnet-tune predict` writes for an image."""
    out = registry / f"predicted-{name}"
    result = cli(
        "predict", "--model", CHAMPION, registry / f"{name}.png", "--out", out,
        "--prob-format", "tiff",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    prob = np.asarray(Image.open(out / f"{name}_prob.tif"))
    return prob, np.asarray(Image.open(out / f"{name}_mask.png"))


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, OSError):
        return 0


def _post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
