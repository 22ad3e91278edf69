"""Lung CT slices (Kaggle "Finding and Measuring Lungs in CT Data", 2-D TIFF part).

Each slice's group is its patient, parsed from the official names (ID_XXXX_Z_YYYY.tif); a
slice whose name carries no patient ID is its own group, and the dataset card says so.
Cross-validation folds never split a group. The "patient" split (default) takes the sorted
patient IDs: the first floor(0.7 P) are for training (the last 20 % of those, from int(0.8 p),
validate, as Keras' validation_split does) and the rest for testing, so no patient spans two
splits. The "sorted" split applies the same fractions to the sorted slices, as published; a
patient may then span two splits.

Intensities are mapped by what the data looks like (recorded in the settings): negative
values mean Hounsfield units, clipped to [-512, 512] and min-maxed per slice; 8-bit slices are
divided by 255; anything else is min-maxed per slice. Images are resized bilinearly and masks
by nearest neighbour when they are not ``size`` x ``size``. Mask files are thresholded (> 127,
or > 0 for {0, 1} masks).

Targets: "direct" trains on the lung mask, evaluated over all pixels (recommended). The
labelled secondary mode "bcdu-outside" reproduces BCDU: body = 15x15 erosion of (HU > -512),
FOV = holes of (body | lung) filled with a 5x5 structure, target = FOV & ~lung. Without HU
data the body is the slice above its Otsu threshold, which, like HU > -512, separates tissue
from air and aerated lung. The lung and FOV go into the split's extras for the legacy
evaluation (estimated lung = FOV & ~prediction), which leaks ground truth through the FOV.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from mapnet_tune.data.base import Loader, Scan, Split
from mapnet_tune.data.imageops import (
    HU_WINDOW,
    binary_mask,
    check_same_size,
    choose_intensity,
    chw,
    resize_image,
    resize_mask,
    scale_intensity,
    stack,
    to_grey,
)
from mapnet_tune.data.io import Role, pair_files, read_all, read_image, require_dir, require_source
from mapnet_tune.data.options import Option, choice, integer
from mapnet_tune.data.splits import group_blocks, require_nonempty

LAYOUT = "2d_images/NAME.tif with 2d_masks/NAME.tif of the same name"
TRAIN_FRACTION, KERAS_VALIDATION = 0.7, 0.2
BODY_EROSION, FILL_STRUCTURE = 15, 5
PATIENT = re.compile(r"(ID_\d+)_")

OPTIONS = {
    "target": Option(
        "direct", choice("direct", "bcdu-outside"), "direct: the lung; bcdu-outside: FOV & ~lung"
    ),
    "size": Option(512, integer(8), "side of the square slices"),
    "split": Option(
        "patient", choice("patient", "sorted"), "cut whole patients, or sorted slices as published"
    ),
}


def scan(source: Path | None, options: dict) -> Scan:
    """Check the layout and pair every slice with its mask."""
    root = require_source(source, "lung")
    roles = [
        Role(require_dir(root, "2d_images", LAYOUT), "slice", r"(.+)", "{}.tif"),
        Role(require_dir(root, "2d_masks", LAYOUT), "mask", r"(.+)", "{}.tif"),
    ]
    return Scan(root, {"pairs": pair_files(roles)})


def build(scanned: Scan, options: dict) -> tuple[dict[str, Split], dict]:
    """Read, map intensities, build the target and cut train / val / test."""
    items = scanned.groups["pairs"]
    stems = [p.stem for p, _ in items]
    patients = tuple(_patient(stem) for stem in stems)
    keys = patients if options["split"] == "patient" else stems
    sizes = _split_sizes(len(set(keys)))
    require_nonempty(
        dict(zip(("train", "val", "test"), sizes, strict=True)),
        f"lung set {scanned.root} with {len(items)} slices of {len(set(patients))} patients",
        "add slices (patients, for split=patient)",
    )
    size = (options["size"], options["size"])
    raw = read_all(lambda item: _read_pair(item, size), items)
    mode = choose_intensity([image for image, _ in raw], allow_hu=True)
    images = [scale_intensity(image, mode) for image, _ in raw]
    lungs = np.stack([mask[None] for _, mask in raw])
    extras = {}
    masks = lungs
    if options["target"] == "bcdu-outside":
        body_fov = np.stack(
            [
                _fov(image, scaled, mask, mode)[None]
                for (image, mask), scaled in zip(raw, images, strict=True)
            ]
        )
        masks = body_fov & (1 - lungs)
        extras = {"lung": lungs, "body_fov": body_fov}
    everything = Split(
        images=stack([chw(image) for image in images]),
        masks=masks,
        fov=None,
        names=tuple(stems),
        extras=extras,
        groups=patients,
    )
    splits = group_blocks(everything, keys, ("train", "val", "test"), sizes)
    settings = {
        "intensity": mode,
        "split_sizes": [len(split.names) for split in splits.values()],
        "notes": _notes(options, mode, stems),
    }
    return splits, settings


def preprocess(settings: dict, images: list[np.ndarray]) -> np.ndarray:
    """Greyscale, resize and map intensities as recorded for the prepared set."""
    size = (settings["size"], settings["size"])
    return stack(
        [
            chw(scale_intensity(resize_image(_grey(image), size), settings["intensity"]))
            for image in images
        ]
    )


def _grey(image: np.ndarray) -> np.ndarray:
    """Single-channel slices pass through; 8-bit RGB re-encodings become 8-bit grey."""
    if image.ndim == 2:
        return image
    grey = to_grey(image)
    return np.round(grey).astype(np.uint8) if image.dtype == np.uint8 else grey


def _read_pair(item: tuple[Path, ...], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    image_path, mask_path = item
    image = _grey(read_image(image_path))
    mask = binary_mask(read_image(mask_path), mask_path, strict=False)
    check_same_size(image, image_path, mask, mask_path)
    return resize_image(image, size), resize_mask(mask, size)


def _fov(raw: np.ndarray, scaled: np.ndarray, lung: np.ndarray, mode: str) -> np.ndarray:
    """BCDU's body region including the lungs: fill_holes(erode(body) | lung)."""
    if mode == "hu":
        body = raw > HU_WINDOW[0]
    else:
        grey = (scaled * 255).astype(np.uint8)
        threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        body = grey > threshold
    eroded = ndimage.binary_erosion(body, structure=np.ones((BODY_EROSION, BODY_EROSION)))
    filled = ndimage.binary_fill_holes(
        eroded | lung.astype(bool), structure=np.ones((FILL_STRUCTURE, FILL_STRUCTURE))
    )
    return filled.astype(np.uint8)


def _patient(stem: str) -> str:
    """The patient ID of a slice name, or the name itself when it carries none."""
    found = PATIENT.match(stem)
    return found.group(1) if found else stem


def _split_sizes(count: int) -> tuple[int, int, int]:
    """Train / val / test sizes, in patients or slices, of ``count`` sorted ones."""
    train_val = math.floor(TRAIN_FRACTION * count)
    train = int(train_val * (1 - KERAS_VALIDATION))
    return train, train_val - train, count - train_val


def _notes(options: dict, mode: str, stems: list[str]) -> list[str]:
    split = {
        "patient": "split: by patient, so no patient spans two splits",
        "sorted": "split: sorted slices, as published; a patient may span two splits",
    }[options["split"]]
    notes = [f"intensity mapping: {mode}", split]
    unnamed = sum(PATIENT.match(stem) is None for stem in stems)
    if unnamed:
        notes.append(
            f"{unnamed} of {len(stems)} slice names carry no patient ID (ID_XXXX_...): each "
            "of those is grouped by itself, so slices of one patient may sit on both sides of "
            "a cross-validation fold or of train/test"
        )
    if options["target"] == "bcdu-outside":
        body = "HU > -512" if mode == "hu" else "above the slice's Otsu threshold"
        notes.append(
            f"target bcdu-outside: FOV minus lung (body {body}); its legacy evaluation leaks "
            "ground truth through the FOV"
        )
    else:
        notes.append("target direct: the lung mask, evaluated over all pixels")
    return notes


LOADER = Loader(
    name="lung",
    summary="Kaggle lung CT 2-D slices (2d_images/ and 2d_masks/)",
    options=OPTIONS,
    scan=scan,
    build=build,
    preprocess=preprocess,
)
