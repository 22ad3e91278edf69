"""DRIVE retinal vessels: the orobix / BCDU-Net preprocessing chain and training patches.

Per set (training, or test), faithfully: greyscale Y = 0.299 R + 0.587 G + 0.114 B in float;
z-score with the mean and population std over every pixel of the set's images (FOV or not);
per-image min-max to [0, 255]; uint8 truncation; CLAHE (clip limit 2, 8x8 tiles); gamma 1.2
through a truncated lookup table; / 255. The z-score is an affine map with a positive scale,
which the per-image min-max undoes: each image's result depends on that image alone (up to
float rounding), so no statistic of the test set reaches a test image. Images are sorted by
file name.

In "rgb" input mode the same steps run on each colour channel separately (per-channel
statistics, min-max and CLAHE), so colour survives and hue augmentation has something to act
on; "grey" is the faithful default.

Training patches: square crop of the images to their width (rows 9:574 for 584x565), patch
corners drawn uniformly and seeded so that whole patches lie in the crop, stored in
full-image coordinates. The FOV restriction is off by default, as it effectively is in BCDU.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from mapnet_tune.data.base import Loader, Scan, Split
from mapnet_tune.data.imageops import binary_mask, check_same_size, match_channels, stack, to_grey
from mapnet_tune.data.io import Role, pair_files, read_all, read_image, require_dir, require_source
from mapnet_tune.data.options import Option, boolean, choice, integer, optional
from mapnet_tune.errors import UserError

LAYOUT = (
    "training/images/NN_training.tif, training/1st_manual/NN_manual1.gif and "
    "training/mask/NN_training_mask.gif (and optionally test/ with NN_test.tif and "
    "NN_test_mask.gif)"
)
GAMMA = 1.2
# Entry v = uint8((v / 255) ** (1 / gamma) * 255), truncated, as in the published chain.
GAMMA_LUT = ((np.arange(256) / 255.0) ** (1.0 / GAMMA) * 255.0).astype(np.uint8)
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = 8
# Validation images (the last ones by name) and default patches per image of each protocol.
VAL_IMAGES = {"orobix": 2, "bcdu-code": 4}
DEFAULT_PATCHES = {"orobix": 9500, "bcdu-code": 10000}
# BCDU's inside-FOV test for patch centres: radius 270 px in the 565 px crop, less half the
# patch diagonal.
FOV_RADIUS, FOV_CROP = 270, 565

OPTIONS = {
    "input_mode": Option("grey", choice("grey", "rgb"), "grey (faithful) or rgb"),
    "patch_size": Option(64, integer(2), "side of the square training patches"),
    "patches_per_image": Option(
        None, optional(integer(1)), "default 9500 (orobix) or 10000 (bcdu-code)"
    ),
    "patch_protocol": Option(
        "orobix",
        choice("orobix", "bcdu-code"),
        "orobix: last 2 images validate; bcdu-code: last 4 images validate",
    ),
    "patches_inside_fov": Option(
        False, boolean, "keep only patch centres inside BCDU's FOV circle (off as published)"
    ),
    "seed": Option(10, integer(0), "seed of the patch positions"),
}


def scan(source: Path | None, options: dict) -> Scan:
    """Check the official layout and pair images, manual segmentations and FOV masks."""
    root = require_source(source, "drive")
    groups = {"training": _pair(root, "training")}
    if (root / "test").exists():
        groups["test"] = _pair(root, "test")
    return Scan(root, groups)


def _pair(root: Path, kind: str) -> list[tuple[Path, ...]]:
    return pair_files(
        [
            Role(
                require_dir(root, f"{kind}/images", LAYOUT),
                "image",
                rf"(\d+)_{kind}",
                f"{{}}_{kind}.tif",
            ),
            Role(
                require_dir(root, f"{kind}/1st_manual", LAYOUT),
                "manual segmentation",
                r"(\d+)_manual1",
                "{}_manual1.gif",
            ),
            Role(
                require_dir(root, f"{kind}/mask", LAYOUT),
                "FOV mask",
                rf"(\d+)_{kind}_mask",
                f"{{}}_{kind}_mask.gif",
            ),
        ]
    )


def build(scanned: Scan, options: dict) -> tuple[dict[str, Split], dict]:
    """Preprocess the sets, split training/validation by image and draw the patches."""
    protocol = options["patch_protocol"]
    per_image = options["patches_per_image"] or DEFAULT_PATCHES[protocol]
    n_val = VAL_IMAGES[protocol]
    if len(scanned.groups["training"]) <= n_val:
        raise UserError(
            f"{scanned.root / 'training/images'} has {len(scanned.groups['training'])} image(s); "
            f"the {protocol} protocol validates on the last {n_val}, so it needs at least "
            f"{n_val + 1}"
        )
    full, mean, std = _prepare_set(scanned.groups["training"], options["input_mode"])
    top, left, side = _crop(full.images.shape[2:], options["patch_size"])
    rng = np.random.default_rng(options["seed"])
    splits = {}
    for name, index in (("train", slice(None, -n_val)), ("val", slice(-n_val, None))):
        part = full.images[index]
        patches = _patches(rng, len(part), per_image, options, (top, left, side))
        splits[name] = Split(
            images=part,
            masks=full.masks[index],
            fov=full.fov[index],
            names=full.names[index],
            patches=patches,
            patch_size=options["patch_size"],
        )
    settings = {
        "patches_per_image": per_image,
        "mean": mean,
        "std": std,
        "crop": [top, left, side],
        "clahe_clip_limit": CLAHE_CLIP_LIMIT,
        "clahe_tiles": CLAHE_TILES,
        "gamma": GAMMA,
        "notes": [f"{protocol}: validation images {', '.join(splits['val'].names)}"],
    }
    if "test" in scanned.groups:
        splits["test"], settings["test_mean"], settings["test_std"] = _prepare_set(
            scanned.groups["test"], options["input_mode"]
        )
    else:
        settings["notes"].append("no test/ folder in the source, so there is no test split")
    return splits, settings


def preprocess(settings: dict, images: list[np.ndarray]) -> np.ndarray:
    """The chain for new raw images, standardised with the recorded training statistics."""
    planes = [_planes(image, settings["input_mode"])[None] for image in images]
    return stack([enhance(p, settings["mean"], settings["std"])[0] for p in planes])


def enhance(planes: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """Standardise, per-image min-max to [0, 255], truncate, CLAHE, gamma, / 255.

    Args:
        planes: float64 (N, C, H, W) greyscale or colour planes.
        mean: Per-channel mean to subtract.
        std: Per-channel standard deviation to divide by.

    Returns:
        float32 (N, C, H, W) in [0, 1].
    """
    z = (planes - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
    low = z.min(axis=(2, 3), keepdims=True)
    span = z.max(axis=(2, 3), keepdims=True) - low
    scaled = (z - low) / np.where(span > 0, span, 1.0) * 255.0
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
    equalised = np.empty(scaled.shape, np.uint8)
    for n, c in np.ndindex(scaled.shape[:2]):
        # astype truncates towards zero, as the published chain does (no rounding).
        equalised[n, c] = clahe.apply(scaled[n, c].astype(np.uint8))
    return (GAMMA_LUT[equalised] / 255.0).astype(np.float32)


def _planes(image: np.ndarray, mode: str) -> np.ndarray:
    if mode == "grey":
        return to_grey(image)[None]
    return np.moveaxis(match_channels(image, 3).astype(np.float64), 2, 0)


def _prepare_set(items: list[tuple[Path, ...]], mode: str) -> tuple[Split, list, list]:
    """Read and preprocess one set with its own statistics; returns it with mean and std."""
    loaded = read_all(_read_item, items)
    first_path, first = items[0][0], loaded[0][0]
    for (path, *_), (image, *_) in zip(items, loaded, strict=True):
        if image.shape[:2] != first.shape[:2]:
            raise UserError(
                f"image {path} is {image.shape[0]}x{image.shape[1]} but {first_path} is "
                f"{first.shape[0]}x{first.shape[1]} (height x width); DRIVE images share one size"
            )
    planes = np.stack([_planes(image, mode) for image, _, _ in loaded])
    mean = planes.mean(axis=(0, 2, 3))
    std = planes.std(axis=(0, 2, 3))
    std = np.where(std > 0, std, 1.0)
    split = Split(
        images=enhance(planes, mean, std),
        masks=np.stack([manual[None] for _, manual, _ in loaded]),
        fov=np.stack([fov[None] for _, _, fov in loaded]),
        names=tuple(item[0].stem for item in items),
    )
    return split, mean.tolist(), std.tolist()


def _read_item(item: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image_path, manual_path, fov_path = item
    image = read_image(image_path)
    masks = []
    for path in (manual_path, fov_path):
        mask = binary_mask(read_image(path), path, strict=True)
        check_same_size(image, image_path, mask, path)
        masks.append(mask)
    return image, masks[0], masks[1]


def _crop(size: tuple[int, int], patch: int) -> tuple[int, int, int]:
    """(top, left, side) of the centred square crop (rows 9:574 for DRIVE's 584x565)."""
    height, width = size
    side = min(height, width)
    if patch > side:
        raise UserError(
            f"option patch_size {patch} is larger than the {side}x{side} crop of the images; "
            f"choose a patch_size of at most {side}"
        )
    return (height - side) // 2, (width - side) // 2, side


def _patches(
    rng: np.random.Generator,
    images: int,
    per_image: int,
    options: dict,
    crop: tuple[int, int, int],
) -> np.ndarray:
    """int32 (images * per_image, 3) rows (image index, top, left), ordered by image."""
    top, left, side = crop
    size = options["patch_size"]
    rows = []
    for index in range(images):
        corners = _corners(rng, per_image, side, size, options["patches_inside_fov"])
        rows.append(np.column_stack([np.full(per_image, index), corners + (top, left)]))
    return np.concatenate(rows).astype(np.int32)


def _corners(
    rng: np.random.Generator, count: int, side: int, size: int, inside_fov: bool
) -> np.ndarray:
    """(count, 2) uniform (top, left) corners of whole patches in a square crop.

    The corner range [0, side - size] is the published centre range [size/2, side - size/2].
    """
    if not inside_fov:
        return rng.integers(0, side - size + 1, size=(count, 2))
    radius = FOV_RADIUS * side / FOV_CROP - int(size * math.sqrt(2) / 2)
    if radius <= 1:
        raise UserError(
            f"option patches_inside_fov: patch_size {size} leaves no room inside the FOV circle "
            f"of a {side}px crop; use a smaller patch_size or patches_inside_fov=false"
        )
    kept, total = [], 0
    while total < count:
        corners = rng.integers(0, side - size + 1, size=(count, 2))
        offset = corners + size // 2 - side // 2
        inside = corners[np.hypot(offset[:, 0], offset[:, 1]) < radius]
        kept.append(inside)
        total += len(inside)
    return np.concatenate(kept)[:count]


LOADER = Loader(
    name="drive",
    summary="DRIVE retinal vessels (official layout; training/ and optionally test/)",
    options=OPTIONS,
    scan=scan,
    build=build,
    preprocess=preprocess,
)
