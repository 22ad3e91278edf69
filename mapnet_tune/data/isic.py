"""ISIC 2018 Task 1 skin lesions: BCDU-Net's split and resizing, MAP-Net normalisation.

Images and masks are sorted by ISIC ID and cut by position into 1815 / 259 / 520 (train /
val / test), scaled proportionally when the folder holds a subset (see
:func:`~mapnet_tune.data.splits.proportional_sizes`). Both are resized with PIL bilinear on
uint8, as ``scipy.misc.imresize`` did; the resized mask is thresholded at mask / 255 > 0.5
("correct", the default) or raw > 0.5, i.e. any non-zero value ("bcdu").

Option ``split``: "sorted" (default) keeps BCDU's order of blocks; "seed-swap" is a labelled
legacy split that reproduces the seed report's notebook, which wrote the 259-image block
(positions 1815-2073) to "Test" and the 520-image block to "Valid": the 259 block is the test
split and the 520 block validation. It is there to compare with the published numbers, not
recommended: it tests on half as many images.

Normalisation: BCDU z-scores each split over all its values and then min-maxes each image
(all channels together) to [0, 255]; this project then divides by 255. A z-score is an
affine map with a positive scale, so the per-image min-max that follows undoes it exactly:
the split-level statistics have no effect and are skipped, which also makes training and
prediction preprocessing identical (per-image min-max to [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mapnet_tune.data.base import Loader, Scan, Split
from mapnet_tune.data.imageops import (
    check_same_size,
    chw,
    match_channels,
    minmax,
    resize_image,
    single_channel,
    stack,
)
from mapnet_tune.data.io import Role, pair_files, read_all, read_image, require_dir, require_source
from mapnet_tune.data.options import Option, choice, integer
from mapnet_tune.data.splits import blocks, proportional_sizes
from mapnet_tune.errors import UserError

IMAGES = "ISIC2018_Task1-2_Training_Input"
MASKS = "ISIC2018_Task1_Training_GroundTruth"
LAYOUT = f"{IMAGES}/ISIC_XXXXXXX.jpg with {MASKS}/ISIC_XXXXXXX_segmentation.png"
# BCDU's split of the 2,594 training images by position.
SPLIT_WEIGHTS = (1815, 259, 520)

OPTIONS = {
    "size": Option(256, integer(8), "side of the square resized images"),
    "gt_threshold": Option(
        "correct",
        choice("correct", "bcdu"),
        "correct: mask / 255 > 0.5; bcdu: raw mask > 0.5 (any non-zero value)",
    ),
    "split": Option(
        "sorted",
        choice("sorted", "seed-swap"),
        "sorted: train / val / test blocks; seed-swap: the seed notebook's, test and val swapped",
    ),
}


def scan(source: Path | None, options: dict) -> Scan:
    """Check the official layout and pair every image with its segmentation."""
    root = require_source(source, "isic")
    roles = [
        Role(require_dir(root, IMAGES, LAYOUT), "image", r"(ISIC_\d+)", "{}.jpg"),
        Role(
            require_dir(root, MASKS, LAYOUT),
            "segmentation",
            r"(ISIC_\d+)_segmentation",
            "{}_segmentation.png",
        ),
    ]
    return Scan(root, {"pairs": pair_files(roles)})


def build(scanned: Scan, options: dict) -> tuple[dict[str, Split], dict]:
    """Resize, threshold, normalise and cut the sorted images into train / val / test."""
    items = scanned.groups["pairs"]
    size = options["size"]
    threshold = 127 if options["gt_threshold"] == "correct" else 0

    def load(item: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = item
        image = read_image(image_path)
        mask = single_channel(read_image(mask_path), mask_path)
        check_same_size(image, image_path, mask, mask_path)
        resized = resize_image(mask.astype(np.uint8), (size, size))
        # On uint8, mask / 255 > 0.5 is mask > 127.5, i.e. > 127.
        return _resized(image, size, str(image_path)), (resized > threshold).astype(np.uint8)[None]

    loaded = read_all(load, items)
    # Filled in place: the float32 copy of the full set is 2 GB at 256 px, so avoid a second.
    images = np.empty((len(items), 3, size, size), np.float32)
    for index, (image, _) in enumerate(loaded):
        images[index] = _normalise(image)
    everything = Split(
        images=images,
        masks=np.stack([mask for _, mask in loaded]),
        fov=None,
        names=tuple(image_path.stem for image_path, _ in items),
    )
    sizes = proportional_sizes(len(items), SPLIT_WEIGHTS, f"{scanned.root / IMAGES}")
    notes = ["split by position after sorting by ISIC ID"]
    order = ("train", "val", "test")
    if options["split"] == "seed-swap":
        # The seed notebook's folders: the second (259) block is "Test", the third "Valid".
        order = ("train", "test", "val")
        notes.append(
            "split seed-swap: legacy split reproducing the seed report's notebook (the 259-image "
            "block is the test split, the 520-image block validation); not recommended"
        )
    cut = blocks(everything, order, sizes)
    splits = {name: cut[name] for name in ("train", "val", "test")}
    settings = {
        "split_sizes": [len(split.images) for split in splits.values()],
        "normalisation": "per-image min-max to [0, 1]",
        "notes": notes,
    }
    return splits, settings


def preprocess(settings: dict, images: list[np.ndarray]) -> np.ndarray:
    """Resize and normalise new 8-bit RGB images exactly as the prepared ones."""
    return stack([_normalise(_resized(image, settings["size"])) for image in images])


def _resized(image: np.ndarray, size: int, name: str = "an image") -> np.ndarray:
    """uint8 (size, size, 3): PIL bilinear on the 8-bit image, as scipy.misc.imresize did."""
    if image.dtype != np.uint8:
        raise UserError(
            f"ISIC preprocessing takes 8-bit RGB images but {name} is {image.dtype}; convert it "
            "to 8-bit (e.g. save it as JPEG or PNG)"
        )
    return resize_image(match_channels(image, 3), (size, size))


def _normalise(image: np.ndarray) -> np.ndarray:
    """float32 (3, H, W): per-image min-max over all channels together to [0, 1]."""
    return chw(minmax(image))


LOADER = Loader(
    name="isic",
    summary="ISIC 2018 Task 1 skin lesions (official training release layout)",
    options=OPTIONS,
    scan=scan,
    build=build,
    preprocess=preprocess,
)
