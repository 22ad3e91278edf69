"""Loaders on tiny files in the official layouts, synthetic data, options and the cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mapnet_tune.data import (
    DATASETS,
    cache,
    dataset_names,
    prepare,
    preprocess_images,
    read_image,
)
from mapnet_tune.data.splits import proportional_sizes
from mapnet_tune.data.synthetic import vessel_image
from mapnet_tune.errors import UserError
from tests.conftest import (
    rename_cases,
    save_image,
    write_drive,
    write_folder,
    write_isic,
    write_lung,
)


def test_registry_names():
    assert dataset_names() == ["drive", "folder", "isic", "lung", "synthetic"]


# DRIVE layout with a test split (the real test split is not available here).


def test_drive_tiny_layout_with_test_split(tmp_path):
    root = write_drive(tmp_path / "DRIVE", ids=range(21, 25))
    write_drive(root, ids=range(1, 4), kind="test")
    options = {"patch_size": "8", "patches_per_image": 5, "seed": 3}
    data = prepare("drive", root, options, cache_dir=tmp_path / "cache")
    train, val, test = (data.splits[k] for k in ("train", "val", "test"))
    assert train.names == ("21_training", "22_training") and len(val.names) == 2
    assert test.names == ("1_test", "2_test", "3_test") and test.patches is None
    assert test.images.shape == (3, 1, 30, 26) and test.fov.shape == (3, 1, 30, 26)
    assert data.settings["test_mean"] != data.settings["mean"]  # the published chain's own
    # ... which the per-image min-max cancels: no test-set note is needed or made.
    assert not any("test set" in note for note in data.settings["notes"])
    # Square crop to the width: rows 2:28 of the 30x26 images.
    assert data.settings["crop"] == [2, 0, 26]
    assert len(train.patches) == 10 and train.patches[:, 1].min() >= 2
    assert train.patches[:, 1].max() + 8 <= 28 and train.patches[:, 2].max() + 8 <= 26
    assert set(np.unique(train.masks)) <= {0, 1}
    again = preprocess_images(data.settings, [read_image(root / "training/images/21_training.tif")])
    assert np.array_equal(again[0], train.images[0])


def test_drive_patches_inside_fov(tmp_path):
    root = write_drive(tmp_path / "DRIVE", size=(120, 100))
    options = {"patch_size": 16, "patches_per_image": 200, "patches_inside_fov": True}
    data = prepare("drive", root, options, cache_dir=tmp_path / "cache")
    patches = data.splits["train"].patches
    top, left, side = data.settings["crop"]
    centre_y = patches[:, 1] - top + 8 - side // 2
    centre_x = patches[:, 2] - left + 8 - side // 2
    radius = 270 * side / 565 - int(16 * 2**0.5 / 2)
    assert len(patches) == 200 and (np.hypot(centre_y, centre_x) < radius).all()


# ISIC


def test_proportional_sizes():
    assert proportional_sizes(2594, (1815, 259, 520), "isic") == (1815, 259, 520)
    assert proportional_sizes(7, (1815, 259, 520), "isic") == (5, 1, 1)
    assert proportional_sizes(3, (1815, 259, 520), "isic") == (1, 1, 1)
    assert sum(proportional_sizes(100, (1815, 259, 520), "isic")) == 100
    with pytest.raises(UserError, match="too few"):
        proportional_sizes(2, (1815, 259, 520), "isic")


def test_isic_split_resize_and_normalisation(tmp_path):
    root = write_isic(tmp_path / "isic", count=7)
    data = prepare("isic", root, {"size": 16}, cache_dir=tmp_path / "cache")
    sizes = {k: len(s.names) for k, s in data.splits.items()}
    assert sizes == {"train": 5, "val": 1, "test": 1}
    assert data.splits["train"].names[0] == "ISIC_0000000"
    assert data.splits["test"].names == ("ISIC_0000006",)
    images = data.splits["train"].images
    assert images.shape == (5, 3, 16, 16) and data.channels == 3
    assert np.allclose(images.min(axis=(1, 2, 3)), 0) and np.allclose(images.max(axis=(1, 2, 3)), 1)
    assert data.splits["train"].fov is None
    photo = read_image(root / "ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg")
    assert np.array_equal(preprocess_images(data.settings, [photo])[0], images[0])


def test_isic_ground_truth_thresholds(tmp_path):
    root = write_isic(tmp_path / "isic", count=7)
    correct = prepare("isic", root, {"size": 16}, cache_dir=tmp_path / "cache")
    bcdu = prepare("isic", root, {"size": 16, "gt_threshold": "bcdu"}, cache_dir=tmp_path / "cache")
    assert correct.fingerprint != bcdu.fingerprint
    path = root / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png"
    resized = np.asarray(Image.open(path).resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(correct.splits["train"].masks[0, 0], (resized / 255 > 0.5))
    assert np.array_equal(bcdu.splits["train"].masks[0, 0], (resized > 0.5))
    # Bilinear edges are grey, so "any non-zero" marks more lesion than "> 127".
    assert bcdu.splits["train"].masks.sum() > correct.splits["train"].masks.sum()


# Lung


def test_lung_hu_direct(tmp_path):
    root = write_lung(tmp_path / "lung", count=10)
    data = prepare("lung", root, {"size": 48, "split": "sorted"}, cache_dir=tmp_path / "cache")
    assert data.settings["intensity"] == "hu"
    # The published split: floor(0.7 * 10) = 7 train+val, int(7 * 0.8) = 5 train.
    assert [len(data.splits[k].names) for k in ("train", "val", "test")] == [5, 2, 3]
    train = data.splits["train"]
    assert train.images.shape == (5, 1, 48, 48) and train.fov is None and not train.extras
    assert train.images.min() == 0 and train.images.max() == 1
    lung = np.asarray(Image.open(root / "2d_masks/ID_0000_Z_0000.tif")) > 127
    nearest = np.asarray(Image.fromarray(lung).resize((48, 48), Image.Resampling.NEAREST))
    assert np.array_equal(train.masks[0, 0], nearest)
    assert "target direct" in data.card() and "a patient may span two splits" in data.card()


@pytest.mark.parametrize("hu", [True, False])
def test_lung_bcdu_outside(tmp_path, hu):
    root = write_lung(tmp_path / "lung", count=10, hu=hu)
    data = prepare("lung", root, {"target": "bcdu-outside", "size": 128}, cache_dir=tmp_path / "c")
    assert data.settings["intensity"] == ("hu" if hu else "uint8")
    split = data.splits["train"]
    lung, body_fov = split.extras["lung"], split.extras["body_fov"]
    assert np.array_equal(split.masks, body_fov & (1 - lung))
    assert (body_fov >= lung).all()
    # Legacy evaluation: estimated lung = FOV and not (predicted outside); perfect here.
    assert np.array_equal(body_fov & (1 - split.masks), lung)
    # The FOV is the whole body ellipse (lungs included) eroded by the 15x15 square.
    raw = np.asarray(Image.open(root / "2d_images/ID_0000_Z_0000.tif"))
    ellipse = raw > raw.min()  # everything but the air around the body
    expected = ndimage.binary_erosion(ellipse, np.ones((15, 15)))
    assert np.array_equal(body_fov[0, 0], expected)
    assert "bcdu-outside" in data.card() and "leaks" in data.card()


def test_lung_splits_and_groups_by_patient_by_default(tmp_path):
    root = write_lung(tmp_path / "lung", count=10, per_patient=4)
    data = prepare("lung", root, {"size": 32}, cache_dir=tmp_path / "cache")
    patients = {k: {n[:7] for n in s.names} for k, s in data.splits.items()}
    # Patients of 4, 4 and 2 slices: floor(0.7 * 3) = 2 train+val, int(2 * 0.8) = 1 train.
    assert patients == {"train": {"ID_0000"}, "val": {"ID_0001"}, "test": {"ID_0002"}}
    assert data.splits["train"].groups == ("ID_0000",) * 4
    assert "no patient spans two splits" in data.card()
    # The groups survive the cache; an entry written before splits had groups is rebuilt.
    cached = prepare("lung", root, {"size": 32}, cache_dir=tmp_path / "cache")
    assert cached.splits["val"].groups == ("ID_0001",) * 4
    meta_path = cache.entry_dir(tmp_path / "cache", "lung", data.fingerprint) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for info in meta["splits"].values():
        del info["groups"]
    meta_path.write_text(json.dumps(meta))
    rebuilt = prepare("lung", root, {"size": 32}, cache_dir=tmp_path / "cache")
    assert rebuilt.fingerprint == data.fingerprint
    assert rebuilt.splits["test"].groups == ("ID_0002",) * 2


def test_lung_names_without_patient_ids_group_by_slice_and_say_so(tmp_path):
    root = write_lung(tmp_path / "lung", count=10)
    for folder in ("2d_images", "2d_masks"):
        for path in (root / folder).iterdir():
            path.rename(path.with_name(path.name.replace("ID_", "scan")))
    data = prepare("lung", root, {"size": 32}, cache_dir=tmp_path / "cache")
    assert [len(data.splits[k].names) for k in ("train", "val", "test")] == [5, 2, 3]
    assert data.splits["train"].image_groups == data.splits["train"].names
    assert "10 of 10 slice names carry no patient ID" in data.card()


# Folder


def test_folder_splits_channels_and_sizes(tmp_path):
    root = write_folder(tmp_path / "own", count=10)
    options = {"val_fraction": 0.2, "test_fraction": 0.2}
    data = prepare("folder", root, options, cache_dir=tmp_path / "cache")
    assert [len(data.splits[k].names) for k in ("train", "val", "test")] == [6, 2, 2]
    assert data.channels == 3 and data.settings["intensity"] == "uint8"
    assert data.splits["train"].images.shape == (6, 3, 20, 24)
    grey = prepare("folder", root, {"channels": 1, "size": 16}, cache_dir=tmp_path / "cache")
    assert grey.splits["train"].images.shape == (8, 1, 16, 16) and "test" not in grey.splits
    new = read_image(root / "images/case00.png")
    assert np.allclose(preprocess_images(grey.settings, [new])[0], grey.splits["train"].images[0])


def test_folder_groups_regex_keeps_each_group_in_one_split(tmp_path):
    root = write_folder(tmp_path / "own", count=10)
    # Patient = case number // 3, written as a suffix, so groups are not contiguous by name.
    rename_cases(root, lambda stem, number: f"{stem}_p{number % 3}.png")
    options = {"val_fraction": 0.3, "test_fraction": 0.3, "groups": r"_(p\d)$"}
    data = prepare("folder", root, options, cache_dir=tmp_path / "cache")
    groups = {k: set(s.groups) for k, s in data.splits.items()}
    assert groups == {"train": {"p0"}, "val": {"p1"}, "test": {"p2"}}
    assert all(
        n.endswith(g) for s in data.splits.values() for n, g in zip(s.names, s.groups, strict=True)
    )
    with pytest.raises(UserError, match="option groups '_x' does not match"):
        prepare("folder", root, {"groups": "_x"}, cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="option groups must be a regular expression"):
        prepare("folder", root, {"groups": "("}, cache_dir=tmp_path / "cache")


def test_folder_masks_zero_one_and_binarize(tmp_path):
    root = write_folder(tmp_path / "own", count=5, colour=False)
    save_image(root / "masks/case00.png", (np.arange(480).reshape(20, 24) % 2).astype(np.uint8))
    save_image(root / "masks/case01.png", np.linspace(0, 255, 480).reshape(20, 24).astype(np.uint8))
    with pytest.raises(UserError, match="binarize"):
        prepare("folder", root, cache_dir=tmp_path / "cache")
    data = prepare("folder", root, {"binarize": True}, cache_dir=tmp_path / "cache")
    masks = data.splits["train"].masks
    assert masks[0].sum() == 240  # {0, 1} mask: > 0
    assert masks[1].sum() == np.count_nonzero(np.linspace(0, 255, 480).astype(np.uint8) > 127)
    assert data.channels == 1


# Synthetic


def test_synthetic_is_deterministic_and_vessel_like(tmp_path):
    first = prepare("synthetic", None, cache_dir=tmp_path / "a")
    again = prepare("synthetic", None, cache_dir=tmp_path / "b")
    other = prepare("synthetic", None, {"seed": 1}, cache_dir=tmp_path / "a")
    assert [len(first.splits[k].names) for k in ("train", "val", "test")] == [48, 16, 16]
    for name, split in first.splits.items():
        assert np.array_equal(split.images, again.splits[name].images)
        assert np.array_equal(split.masks, again.splits[name].masks)
        assert not np.array_equal(split.images, other.splits[name].images)
    train = first.splits["train"]
    assert train.images.shape == (48, 1, 64, 64) and train.images.dtype == np.float32
    fractions = (train.masks & train.fov).sum(axis=(1, 2, 3)) / train.fov.sum(axis=(1, 2, 3))
    assert fractions.min() >= 0.08 and fractions.max() <= 0.15
    assert (train.images * (1 - train.fov)).max() == 0  # black outside the field of view
    assert (train.masks <= train.fov).all()


def test_synthetic_vessels_are_visible():
    """Vessels are darker than their surroundings: a local-contrast threshold finds them."""
    ious = []
    for i in range(8):
        image, mask, fov = vessel_image(np.random.default_rng([5, i]), 64, 1)
        contrast = ndimage.uniform_filter(image[0], 7) - image[0]
        found = (contrast > 0.04) & (fov > 0)
        ious.append((found & (mask > 0)).sum() / (found | (mask > 0)).sum())
    assert np.mean(ious) > 0.3  # all-vessel guessing gives about 0.12


def test_synthetic_colour_counts_and_speed(tmp_path):
    started = time.perf_counter()
    data = prepare(
        "synthetic",
        None,
        {"channels": 3, "count": {"train": 48, "val": 2, "test": 2}},
        cache_dir=tmp_path / "cache",
    )
    assert time.perf_counter() - started < 2
    image = data.splits["train"].images[0]
    assert image.shape == (3, 64, 64)
    inside = data.splits["train"].fov[0, 0] > 0
    red, green, blue = (image[c][inside].mean() for c in range(3))
    assert red > green > blue  # a reddish fundus tint


# Options and cache


def test_options_are_validated_and_parsed(tmp_path):
    with pytest.raises(UserError, match="unknown option 'sise'.*size"):
        prepare("synthetic", None, {"sise": 32}, cache_dir=tmp_path)
    with pytest.raises(UserError, match="option size must be an integer"):
        prepare("synthetic", None, {"size": "big"}, cache_dir=tmp_path)
    with pytest.raises(UserError, match="input_mode must be one of grey, rgb"):
        prepare("drive", tmp_path, {"input_mode": "hsv"}, cache_dir=tmp_path)
    data = prepare("synthetic", None, {"size": "32", "count": "4/2/2"}, cache_dir=tmp_path / "c")
    assert data.settings["size"] == 32 and data.settings["count"] == [4, 2, 2]
    assert len(data.fingerprint) == 16 and int(data.fingerprint, 16) >= 0


def test_changed_file_changes_fingerprint(tmp_path):
    root = write_folder(tmp_path / "own", count=5)
    before = prepare("folder", root, cache_dir=tmp_path / "cache")
    assert prepare("folder", root, cache_dir=tmp_path / "cache").fingerprint == before.fingerprint
    save_image(root / "images/case03.png", np.zeros((20, 24, 3), np.uint8))
    after = prepare("folder", root, cache_dir=tmp_path / "cache")
    assert after.fingerprint != before.fingerprint


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    cache_dir = tmp_path / "cache"
    data = prepare("synthetic", None, {"count": "4/2/2"}, cache_dir=cache_dir)
    entry = cache.entry_dir(cache_dir, "synthetic", data.fingerprint)
    (entry / cache.MARKER).unlink()
    (entry / "train.npz").write_bytes(b"half written")
    assert cache.load(cache_dir, "synthetic", data.fingerprint) is None
    rebuilt = prepare("synthetic", None, {"count": "4/2/2"}, cache_dir=cache_dir)
    assert np.array_equal(rebuilt.splits["train"].images, data.splits["train"].images)
    assert (entry / cache.MARKER).is_file()
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no temporary left


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    cache_dir = tmp_path / "cache"
    data = prepare("synthetic", None, {"count": "4/2/2"}, cache_dir=cache_dir)
    entry = cache.entry_dir(cache_dir, "synthetic", data.fingerprint)
    (entry / "val.npz").write_bytes(b"damaged after it was written")
    rebuilt = prepare("synthetic", None, {"count": "4/2/2"}, cache_dir=cache_dir)
    assert np.array_equal(rebuilt.splits["val"].images, data.splits["val"].images)
    assert cache.load(cache_dir, "synthetic", data.fingerprint) is not None


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPNET_TUNE_CACHE", str(tmp_path / "env-cache"))
    data = prepare("synthetic", None, {"count": "4/2/2"})
    assert (tmp_path / "env-cache" / f"synthetic-{data.fingerprint}" / cache.MARKER).is_file()


def test_unwritable_cache_is_a_user_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(UserError, match="MAPNET_TUNE_CACHE"):
        prepare("synthetic", None, {"count": "4/2/2"}, cache_dir=blocker)


def test_cached_dataset_equals_fresh(tmp_path):
    root = write_lung(tmp_path / "lung", count=10)
    options = {"target": "bcdu-outside", "size": 128}
    fresh = prepare("lung", root, options, cache_dir=tmp_path / "cache")
    cached = prepare("lung", root, options, cache_dir=tmp_path / "cache")
    assert cached.settings == fresh.settings and cached.card() == fresh.card()
    for name, split in fresh.splits.items():
        assert set(cached.splits[name].extras) == {"lung", "body_fov"}
        assert np.array_equal(cached.splits[name].extras["lung"], split.extras["lung"])


def test_prepare_help_lists_every_dataset_and_its_options(cli):
    out = " ".join(cli("prepare", "--help").output.split())
    for loader in DATASETS.values():
        assert f"{loader.name}: {' '.join(loader.summary.split())}" in out
        for name in loader.options:
            assert f"{name}=" in out
