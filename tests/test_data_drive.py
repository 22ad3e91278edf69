"""DRIVE preprocessing, patches and cache on the real training set (images 21-40)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from mapnet_tune.data import DATASETS, drive, prepare, preprocess_images, read_image
from tests.conftest import drive_root

pytestmark = pytest.mark.drive


@pytest.fixture(scope="module")
def root():
    path = drive_root()
    if path is None:
        pytest.skip("set MAPNET_TUNE_DRIVE_ROOT to the DRIVE folder holding training/")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(root, cache_dir):
    return prepare("drive", root, cache_dir=cache_dir)


def test_sanity_values(data):
    assert data.settings["mean"] == pytest.approx([83.158], abs=1e-3)
    assert data.settings["std"] == pytest.approx([57.075], abs=1e-3)
    train, val = data.splits["train"], data.splits["val"]
    images = np.concatenate([train.images, val.images])
    assert images.dtype == np.float32 and images.shape == (20, 1, 584, 565)
    assert images.mean() == pytest.approx(0.4343, abs=1e-3)
    assert images.std() == pytest.approx(0.2447, abs=1e-3)
    assert images.min() == 0.0 and images.max() == 1.0
    assert images.mean() * 255 == pytest.approx(110.74, abs=1e-2)
    fov = np.concatenate([train.fov, val.fov])
    masks = np.concatenate([train.masks, val.masks])
    assert np.count_nonzero(fov) == 4_541_006
    assert np.count_nonzero(masks & fov) / np.count_nonzero(fov) == pytest.approx(0.1254, abs=1e-3)
    assert masks.mean() == pytest.approx(0.0863, abs=1e-3)
    assert list(drive.GAMMA_LUT[:5]) == [0, 2, 4, 6, 7]
    assert list(drive.GAMMA_LUT[-3:]) == [253, 254, 255]


def test_orobix_split_and_patches(data):
    train, val = data.splits["train"], data.splits["val"]
    assert train.names == tuple(f"{i}_training" for i in range(21, 39))
    assert val.names == ("39_training", "40_training")
    assert "test" not in data.splits
    assert "none" in data.card() and "no test/ folder" in data.card()
    for split, images in ((train, 18), (val, 2)):
        patches = split.patches
        assert patches.dtype == np.int32 and split.patch_size == 64
        assert len(patches) == images * 9500
        assert np.array_equal(np.bincount(patches[:, 0]), np.full(images, 9500))
        # Whole 64x64 patches inside the 565x565 crop (rows 9:574) of the 584x565 images.
        assert patches[:, 1].min() >= 9 and patches[:, 1].max() + 64 <= 574
        assert patches[:, 2].min() >= 0 and patches[:, 2].max() + 64 <= 565
    assert len(train.patches) == 171_000 and len(val.patches) == 19_000
    # Uniform corners reach both ends of their range.
    assert train.patches[:, 1].min() == 9 and train.patches[:, 1].max() == 510
    assert train.patches[:, 2].min() == 0 and train.patches[:, 2].max() == 501


def test_second_prepare_is_loaded_from_cache(root, cache_dir, data, monkeypatch):
    def no_build(*args):
        raise AssertionError("the dataset was rebuilt instead of loaded from the cache")

    monkeypatch.setitem(DATASETS, "drive", dataclasses.replace(DATASETS["drive"], build=no_build))
    started = time.perf_counter()
    again = prepare("drive", root, cache_dir=cache_dir)
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"cached prepare took {elapsed:.1f} s"
    assert again.fingerprint == data.fingerprint
    assert again.settings == data.settings
    for name, split in data.splits.items():
        assert np.array_equal(again.splits[name].images, split.images)
        assert np.array_equal(again.splits[name].patches, split.patches)
        assert again.splits[name].names == split.names


def test_patches_are_seeded(root, data, tmp_path):
    same = prepare("drive", root, cache_dir=tmp_path / "fresh")
    assert same.fingerprint == data.fingerprint
    assert np.array_equal(same.splits["train"].patches, data.splits["train"].patches)
    other = prepare("drive", root, {"seed": 11}, cache_dir=tmp_path / "fresh")
    assert other.fingerprint != data.fingerprint
    assert not np.array_equal(other.splits["train"].patches, data.splits["train"].patches)
    assert np.array_equal(other.splits["train"].images, data.splits["train"].images)


def test_bcdu_code_protocol(root, cache_dir):
    data = prepare("drive", root, {"patch_protocol": "bcdu-code"}, cache_dir=cache_dir)
    train, val = data.splits["train"], data.splits["val"]
    assert val.names == tuple(f"{i}_training" for i in range(37, 41))
    assert len(train.patches) == 160_000 and len(val.patches) == 40_000
    assert len(train.patches) + len(val.patches) == 200_000


def test_rgb_mode_per_channel(root, cache_dir):
    data = prepare("drive", root, {"input_mode": "rgb"}, cache_dir=cache_dir)
    assert data.channels == 3
    assert len(data.settings["mean"]) == 3
    images = data.splits["train"].images
    assert images.shape == (18, 3, 584, 565)
    # The red channel of a fundus photograph is the brightest before normalisation.
    assert data.settings["mean"][0] > data.settings["mean"][1] > data.settings["mean"][2]


def test_preprocess_images_repeats_the_chain(root, data):
    raw = read_image(root / "training" / "images" / "21_training.tif")
    assert raw.shape == (584, 565, 3)
    again = preprocess_images(data.settings, [raw])
    assert again.shape == (1, 1, 584, 565)
    assert np.array_equal(again[0], data.splits["train"].images[0])
