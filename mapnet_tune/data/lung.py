"""Lung CT slices (Kaggle "Finding and Measuring Lungs in CT Data", 2-D TIFF part).

Slices are sorted by name; the first floor(0.7 N) are for training (the last 20 % of those,
from int(0.8 n), validate, as Keras' validation_split does) and the rest for testing. The
"patient" split applies the same fractions to the sorted patient IDs (ID_XXXX) instead, so no
patient spans two splits.

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
from mapnet_tune.data.splits import blocks, require_nonempty
from mapnet_tune.errors import UserError

LAYOUT = "2d_images/NAME.tif with 2d_masks/NAME.tif of the same name"
TRAIN_FRACTION, KERAS_VALIDATION = 0.7, 0.2
BODY_EROSION, FILL_STRUCTURE = 15, 5
PATIENT = re.compile(r"(ID_\d+)_")

OPTIONS = {
    "target": Option(
        "direct", choice("direct", "bcdu-outside"), "direct: the lung; bcdu-outside: FOV & ~lung"
    ),
    "size": Option(512, integer(8), "side of the square slices"),
    "split": Option("sorted", choice("sorted", "patient"), "cut sorted slices or patients"),
}


def scan(source: Path | None, options: dict) -> Scan:
    """Check the layout and pair every slice with its mask."""
    root = require_source(source, "lung")
    roles = [
        Role(require_dir(root, "2d_images", LAYOUT), "slice", r"(.+)", "{}.tif"),
        Role(require_dir(root, "2d_masks", LAYOUT), "mask", r"(.+)", "{}.tif"),
    ]
    items = pair_files(roles)
    if options["split"] == "patient":
        for image_path, _ in items:
            if PATIENT.match(image_path.stem) is None:
                raise UserError(
                    f"{image_path}: split=patient needs names like ID_0000_Z_0142.tif; "
                    "rename the files or use split=sorted"
                )
    return Scan(root, {"pairs": items})


def build(scanned: Scan, options: dict) -> tuple[dict[str, Split], dict]:
    """Read, map intensities, build the target and cut train / val / test."""
    items = scanned.groups["pairs"]
    sizes = _split_sizes([p.stem for p, _ in items], options["split"])
    require_nonempty(
        dict(zip(("train", "val", "test"), sizes, strict=True)),
        f"lung set {scanned.root} with {len(items)} slices",
        "add slices (or patients for split=patient)",
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
        names=tuple(image_path.stem for image_path, _ in items),
        extras=extras,
    )
    settings = {"intensity": mode, "split_sizes": list(sizes), "notes": _notes(options, mode)}
    return blocks(everything, ("train", "val", "test"), sizes), settings


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


def _split_sizes(stems: list[str], split: str) -> tuple[int, int, int]:
    """Train / val / test sizes of the sorted slices, on slice or on patient boundaries."""
    if split == "sorted":
        groups = [1] * len(stems)
    else:
        patients = [PATIENT.match(stem).group(1) for stem in stems]
        groups = [patients.count(p) for p in dict.fromkeys(patients)]
    train_val = math.floor(TRAIN_FRACTION * len(groups))
    train = int(train_val * (1 - KERAS_VALIDATION))
    cuts = [sum(groups[:train]), sum(groups[train:train_val]), sum(groups[train_val:])]
    return cuts[0], cuts[1], cuts[2]


def _notes(options: dict, mode: str) -> list[str]:
    notes = [f"intensity mapping: {mode}", f"split: {options['split']}"]
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
