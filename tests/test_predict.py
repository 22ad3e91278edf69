"""`mapnet-tune predict` through the registry: any image size, recorded preprocessing."""

from __future__ import annotations

import os

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from mapnet_tune.data import read_image
from mapnet_tune.data.synthetic import vessel_image
from mapnet_tune.names import CHECKPOINT_ARTIFACT

pytestmark = pytest.mark.slow

CHAMPION = "models:/mapnet-synthetic@champion"


def _images(folder) -> list:
    """Three synthetic 8-bit photographs: square, odd-sized, and grey (a channel mismatch)."""
    folder.mkdir()
    paths = []
    for i, (height, width, grey) in enumerate([(32, 32, False), (37, 45, False), (50, 29, True)]):
        image = vessel_image(np.random.default_rng(i), 64, 3)[0][:, :height, :width]
        array = (image.transpose(1, 2, 0) * 255).astype(np.uint8)
        paths.append(folder / f"image{i}.png")
        Image.fromarray(array[..., 1] if grey else array).save(paths[-1])
    return paths


def test_predict_writes_masks_at_each_size_matching_the_logged_model(registry, cli):
    paths = _images(registry / "new")
    result = cli(
        "predict", "--model", CHAMPION, *paths, "--out", registry / "out", "--batch-size", 2
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3 probability map(s) and mask(s)" in result.output

    # The MLflow model of the same version, loaded by MLflow itself, fed the raw images.
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model(CHAMPION)
    for path in paths:
        prob = np.asarray(Image.open(registry / "out" / f"{path.stem}_prob.png"))
        mask = np.asarray(Image.open(registry / "out" / f"{path.stem}_mask.png"))
        raw = read_image(path)
        assert prob.shape == mask.shape == raw.shape[:2]
        expected = served.predict(raw)
        assert expected["probability"].shape == raw.shape[:2]
        np.testing.assert_array_equal(prob, np.round(expected["probability"] * 255))
        np.testing.assert_array_equal(mask, expected["mask"] * 255)
        assert set(np.unique(mask)) <= {0, 255}

    tta = cli("predict", "--model", CHAMPION, paths[1], "--out", registry / "tta", "--tta")
    assert tta.exit_code == 0, tta.output
    flipped = np.asarray(Image.open(registry / "tta" / "image1_prob.png"))
    assert flipped.shape == (37, 45)


def test_predict_tiff_holds_the_served_probabilities(registry, cli):
    paths = _images(registry / "new")
    result = cli(
        "predict", "--model", CHAMPION, *paths, "--out", registry / "out", "--prob-format", "tiff"
    )
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    served = mlflow.pyfunc.load_model(CHAMPION)
    for path in paths:
        expected = served.predict(read_image(path))
        prob = np.asarray(Image.open(registry / "out" / f"{path.stem}_prob.tif"))
        assert prob.dtype == np.float32 and prob.shape == expected["probability"].shape
        assert np.abs(prob - expected["probability"]).max() <= 1e-6


def test_predict_rejects_bad_input_without_writing(registry, cli):
    good = _images(registry / "new")[0]
    broken = registry / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases = [
        ((CHAMPION, good, broken), f"cannot read image {broken}"),
        (
            ("models:/mapnet-synthetic@best", good),
            "has no alias 'best'; its aliases: @challenger (version 2), @champion",
        ),
        (("models:/mapnet-retina@champion", good), "no registered model 'mapnet-retina'"),
        (("models:/mapnet-synthetic/7", good), "has no version 7; its versions: 1, 2"),
        (("mapnet-synthetic", good), "checkpoint mapnet-synthetic does not exist"),
    ]
    for (model, *images), needle in cases:
        result = cli("predict", "--model", model, *images, "--out", registry / "out")
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output
        assert not (registry / "out").exists()


def test_a_registered_model_that_cannot_load_says_so(registry, cli):
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("mapnet-synthetic", "champion")
    experiment = client.get_run(champion.run_id).info.experiment_id
    for content, needle in [
        (None, f"has no {CHECKPOINT_ARTIFACT}"),
        (b"garbage", "is damaged or not a mapnet-tune checkpoint"),
    ]:
        run = client.create_run(experiment, run_name="not-a-model").info.run_id
        if content is not None:
            (registry / "mapnet.pt").write_bytes(content)
            client.log_artifact(run, str(registry / "mapnet.pt"), "checkpoint")
        version = client.create_model_version("mapnet-synthetic", champion.source, run_id=run)
        result = cli(
            "evaluate",
            "--model",
            f"models:/mapnet-synthetic/{version.version}",
            "--dataset",
            "synthetic",
        )
        assert result.exit_code == 2, result.output
        assert f"mapnet-synthetic version {version.version} cannot be loaded" in result.output
        assert needle in result.output and "Traceback" not in result.output
