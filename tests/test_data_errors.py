"""Bad input: one clear UserError naming the file or folder, and nothing left in the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mapnet_tune.data import prepare, preprocess_images, read_image
from mapnet_tune.errors import UserError
from tests.conftest import save_image, write_drive, write_folder, write_isic, write_lung

DRIVE_OPTIONS = {"patch_size": 8, "patches_per_image": 4}
ISIC_IMAGES = "ISIC2018_Task1-2_Training_Input"
ISIC_MASKS = "ISIC2018_Task1_Training_GroundTruth"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _grey_ramp(shape=(30, 26)) -> np.ndarray:
    return np.linspace(0, 255, shape[0] * shape[1]).reshape(shape).astype(np.uint8)


def _drive_with_test(root: Path) -> None:
    write_drive(root, ids=range(1, 3), kind="test")
    shutil.rmtree(root / "test/mask")


# (id, dataset, writer, corruption, words the message must contain, options)
CASES = [
    ("drive-missing-folder", "drive", write_drive,
     lambda r: shutil.rmtree(r / "training/1st_manual"), ["training/1st_manual/", "layout"], {}),
    ("drive-missing-test-folder", "drive", write_drive, _drive_with_test, ["test/mask/"], {}),
    ("drive-image-without-manual", "drive", write_drive,
     lambda r: (r / "training/1st_manual/22_manual1.gif").unlink(),
     ["22_training.tif", "22_manual1.gif"], {}),
    ("drive-manual-without-image", "drive", write_drive,
     lambda r: (r / "training/images/22_training.tif").unlink(),
     ["22_manual1.gif", "22_training.tif"], {}),
    ("drive-fov-without-image", "drive", write_drive,
     lambda r: save_image(r / "training/mask/29_training_mask.gif", _grey_ramp() * 0),
     ["29_training_mask.gif"], {}),
    ("drive-unreadable-image", "drive", write_drive,
     lambda r: (r / "training/images/21_training.tif").write_bytes(b"not a tiff"),
     ["21_training.tif", "cannot read"], {}),
    ("drive-truncated-manual", "drive", write_drive,
     lambda r: _truncate(r / "training/1st_manual/23_manual1.gif"),
     ["23_manual1.gif", "truncated"], {}),
    ("drive-fov-size", "drive", write_drive,
     lambda r: save_image(r / "training/mask/22_training_mask.gif", np.zeros((20, 26), np.uint8)),
     ["22_training_mask.gif", "20x26", "30x26"], {}),
    ("drive-manual-not-binary", "drive", write_drive,
     lambda r: save_image(r / "training/1st_manual/21_manual1.gif", _grey_ramp()),
     ["21_manual1.gif", "not binary"], {}),
    ("drive-fov-not-binary", "drive", write_drive,
     lambda r: save_image(r / "training/mask/23_training_mask.gif", _grey_ramp()),
     ["23_training_mask.gif", "not binary"], {}),
    ("drive-bad-name", "drive", write_drive,
     lambda r: save_image(r / "training/images/retina.tif", _grey_ramp()),
     ["retina.tif", "ID_training.tif"], {}),
    ("drive-image-size", "drive", write_drive,
     lambda r: write_drive(r, ids=[23], size=(32, 26)), ["23_training.tif", "one size"], {}),
    ("drive-too-few-images", "drive", write_drive,
     lambda r: [(r / f"training/{d}/{n}").unlink() for d, n in
                (("images", "23_training.tif"), ("1st_manual", "23_manual1.gif"),
                 ("mask", "23_training_mask.gif"))],
     ["training/images", "at least 3"], {}),
    ("drive-patch-too-big", "drive", write_drive, lambda r: None, ["patch_size", "26x26"],
     {"patch_size": 64}),
    ("isic-missing-folder", "isic", write_isic, lambda r: shutil.rmtree(r / ISIC_MASKS),
     [ISIC_MASKS, "ISIC_XXXXXXX_segmentation.png"], {}),
    ("isic-image-without-mask", "isic", write_isic,
     lambda r: (r / ISIC_MASKS / "ISIC_0000003_segmentation.png").unlink(),
     ["ISIC_0000003.jpg", "ISIC_0000003_segmentation.png"], {}),
    ("isic-truncated-image", "isic", write_isic,
     lambda r: _truncate(r / ISIC_IMAGES / "ISIC_0000004.jpg"), ["ISIC_0000004.jpg"], {}),
    ("isic-mask-size", "isic", write_isic,
     lambda r: save_image(r / ISIC_MASKS / "ISIC_0000001_segmentation.png", _grey_ramp()),
     ["ISIC_0000001_segmentation.png", "size of its image"], {}),
    ("isic-empty-split", "isic", lambda r: write_isic(r, count=2), lambda r: None,
     [ISIC_IMAGES, "too few"], {}),
    ("lung-missing-folder", "lung", write_lung, lambda r: shutil.rmtree(r / "2d_masks"),
     ["2d_masks/"], {}),
    ("lung-slice-without-mask", "lung", write_lung,
     lambda r: (r / "2d_masks/ID_0001_Z_0005.tif").unlink(), ["ID_0001_Z_0005.tif"], {}),
    ("lung-empty-split", "lung", lambda r: write_lung(r, count=2), lambda r: None,
     ["train split would be empty"], {}),
    ("folder-groups-regex", "folder", write_folder,
     lambda r: None, ["case00.png", "option groups 'P[0-9]'"], {"groups": "P[0-9]"}),
    ("folder-missing-folder", "folder", write_folder, lambda r: shutil.rmtree(r / "masks"),
     ["masks/"], {}),
    ("folder-mask-without-image", "folder", write_folder,
     lambda r: save_image(r / "masks/extra.png", np.zeros((20, 24), np.uint8)),
     ["extra.png", "no image"], {}),
    ("folder-mask-not-binary", "folder", write_folder,
     lambda r: save_image(r / "masks/case04.png", _grey_ramp((20, 24))),
     ["case04.png", "binarize=true"], {}),
    ("folder-mixed-sizes", "folder", write_folder,
     lambda r: write_folder(r, count=1, size=(22, 24)), ["case00.png", "option size"], {}),
    ("folder-too-few", "folder", lambda r: write_folder(r, count=1), lambda r: None,
     ["images", "too few"], {}),
    ("folder-no-images", "folder", write_folder,
     lambda r: [p.unlink() for p in (r / "images").iterdir()], ["no image files"], {}),
    ("folder-fractions", "folder", write_folder, lambda r: None, ["val_fraction"],
     {"val_fraction": 0.5, "test_fraction": 0.5}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("dataset", "write", "corrupt", "words", "options"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_through_the_cli(workdir, cli, dataset, write, corrupt, words, options):
    root = workdir / "source"
    write(root)
    corrupt(root)
    merged = {**(DRIVE_OPTIONS if dataset == "drive" else {}), **options}
    flags = [arg for key, value in merged.items() for arg in ("--option", f"{key}={value}")]
    result = cli("prepare", "--dataset", dataset, "--source", root, *flags)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    for word in words:
        assert word in result.output
    cache_dir = workdir / "cache"
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_unknown_dataset_lists_names(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'retina'.*drive, folder, isic, lung"):
        prepare("retina", tmp_path, cache_dir=tmp_path / "cache")


def test_source_problems(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare("drive", tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="--source"):
        prepare("isic", None, cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="takes no source"):
        prepare("synthetic", tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".tif", ".bmp"])
def test_read_image_reports_truncated_files(tmp_path, suffix):
    path = save_image(tmp_path / f"image{suffix}", np.full((40, 40, 3), 90, np.uint8))
    assert read_image(path).shape[:2] == (40, 40)
    _truncate(path)
    with pytest.raises(UserError, match=f"image{suffix}"):
        read_image(path)
    with pytest.raises(UserError, match="does not exist"):
        read_image(tmp_path / "missing.png")


def test_preprocess_images_errors():
    with pytest.raises(UserError, match="dataset"):
        preprocess_images({}, [np.zeros((4, 4), np.uint8)])
    settings = {"dataset": "synthetic", "channels": 1}
    with pytest.raises(UserError, match="different sizes"):
        preprocess_images(settings, [np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)])
    with pytest.raises(UserError, match="no images"):
        preprocess_images(settings, [])
