"""A user's own dataset: ``images/`` and ``masks/`` with matching file stems.

Files are sorted by name and cut by position into train / val (/ test) blocks by the
fractions, rounded as :func:`~mapnet_tune.data.splits.proportional_sizes` does. With the
``groups`` option (a regular expression over the file stem; its first group, or the whole
match, names the group, e.g. a patient) whole groups are cut instead, in the order of their
first file, and cross-validation folds never split a group; without it every image is its
own group. Masks must be
binary (0 and one foreground value) unless ``binarize`` is set, which thresholds them at 127
(at 0 for {0, 1} masks). Intensities: 8-bit images are divided by 255; other images are
min-maxed per image (recorded in the settings).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mapnet_tune.data.base import Loader, Scan, Split
from mapnet_tune.data.imageops import (
    binary_mask,
    check_same_size,
    choose_intensity,
    chw,
    match_channels,
    resize_image,
    resize_mask,
    scale_intensity,
    stack,
)
from mapnet_tune.data.io import Role, pair_files, read_all, read_image, require_dir, require_source
from mapnet_tune.data.options import Option, boolean, choice, fraction, integer, optional, regex
from mapnet_tune.data.splits import group_blocks, proportional_sizes
from mapnet_tune.errors import UserError

LAYOUT = "images/NAME.png with masks/NAME.png of the same stem (png, jpg, tif, gif or bmp)"

OPTIONS = {
    "size": Option(None, optional(integer(8)), "resize to size x size; default keep"),
    "channels": Option(None, optional(choice(1, 3)), "1 or 3; default: 3 if any image is colour"),
    "val_fraction": Option(0.2, fraction, "fraction of images that validate"),
    "test_fraction": Option(0.0, fraction, "fraction of images for a test split"),
    "binarize": Option(False, boolean, "threshold non-binary masks at 127 instead of refusing"),
    "groups": Option(
        None, optional(regex), "regex over the file stem naming its group, e.g. '^(P\\d+)_'"
    ),
}


def scan(source: Path | None, options: dict) -> Scan:
    """Check the layout and fractions, and pair every image with its mask."""
    root = require_source(source, "folder")
    if options["val_fraction"] <= 0 or options["val_fraction"] + options["test_fraction"] >= 1:
        raise UserError(
            "options val_fraction and test_fraction must give a validation split and leave "
            f"images to train on: val_fraction > 0 and val_fraction + test_fraction < 1, got "
            f"{options['val_fraction']} and {options['test_fraction']}"
        )
    roles = [
        Role(require_dir(root, "images", LAYOUT), "image", r"(.+)", "{}.png"),
        Role(require_dir(root, "masks", LAYOUT), "mask", r"(.+)", "{}.png"),
    ]
    items = pair_files(roles)
    if options["groups"] is not None:
        for image_path, _ in items:
            if re.search(options["groups"], image_path.stem) is None:
                raise UserError(
                    f"{image_path}: option groups '{options['groups']}' does not match the "
                    "name; write a regex that matches every file stem, or drop the option"
                )
    return Scan(root, {"pairs": items})


def build(scanned: Scan, options: dict) -> tuple[dict[str, Split], dict]:
    """Read, check sizes, resize if asked, scale and cut into splits."""
    items = scanned.groups["pairs"]
    fix = "; or set the option binarize=true to threshold it at 127"
    raw = read_all(lambda item: _read_pair(item, not options["binarize"], fix), items)
    channels = options["channels"] or (3 if any(image.ndim == 3 for image, _ in raw) else 1)
    mode = choose_intensity([image for image, _ in raw], allow_hu=False)
    if options["size"] is None:
        _require_one_size(items, raw)
    size = options["size"]
    images, masks = [], []
    for image, mask in raw:
        converted = match_channels(image, channels)
        if size is not None:
            converted, mask = resize_image(converted, (size, size)), resize_mask(mask, (size, size))
        images.append(chw(scale_intensity(converted, mode)))
        masks.append(mask[None])
    stems = tuple(image_path.stem for image_path, _ in items)
    groups = (
        None if options["groups"] is None else tuple(_group(options["groups"], s) for s in stems)
    )
    everything = Split(
        images=stack(images), masks=np.stack(masks), fov=None, names=stems, groups=groups
    )
    val, test = options["val_fraction"], options["test_fraction"]
    names, weights = ("train", "val", "test"), (1 - val - test, val, test)
    if test == 0:
        names, weights = names[:2], weights[:2]
    keys = everything.image_groups
    what = f"{scanned.root / 'images'}" + (" (in groups)" if groups else "")
    sizes = proportional_sizes(len(set(keys)), weights, what)
    splits = group_blocks(everything, keys, names, sizes)
    settings = {
        "channels": channels,
        "intensity": mode,
        "split_sizes": [len(split.names) for split in splits.values()],
        "notes": [
            f"{len(set(keys))} groups by '{options['groups']}'; no group spans two splits"
            if groups
            else "every image is its own group"
        ],
    }
    if test == 0:
        settings["notes"].append("test_fraction is 0, so there is no test split")
    return splits, settings


def preprocess(settings: dict, images: list[np.ndarray]) -> np.ndarray:
    """Convert channels, resize and scale new images as recorded for the prepared set."""
    size = settings["size"]
    out = []
    for image in images:
        converted = match_channels(image, settings["channels"])
        if size is not None:
            converted = resize_image(converted, (size, size))
        out.append(chw(scale_intensity(converted, settings["intensity"])))
    return stack(out)


def _group(pattern: str, stem: str) -> str:
    found = re.search(pattern, stem)
    return found.group(1) if found.re.groups else found.group(0)


def _read_pair(item: tuple[Path, ...], strict: bool, fix: str) -> tuple[np.ndarray, np.ndarray]:
    image_path, mask_path = item
    image = read_image(image_path)
    mask = binary_mask(read_image(mask_path), mask_path, strict=strict, fix=fix)
    check_same_size(image, image_path, mask, mask_path)
    return image, mask


def _require_one_size(items: list[tuple[Path, ...]], raw: list) -> None:
    first = raw[0][0].shape[:2]
    for (image_path, _), (image, _) in zip(items, raw, strict=True):
        if image.shape[:2] != first:
            raise UserError(
                f"image {image_path} is {image.shape[0]}x{image.shape[1]} but {items[0][0]} is "
                f"{first[0]}x{first[1]} (height x width); set the option size (e.g. size=256) "
                "to resize every image to one size"
            )


LOADER = Loader(
    name="folder",
    summary="your own images/ and masks/ folders with matching file names",
    options=OPTIONS,
    scan=scan,
    build=build,
    preprocess=preprocess,
)
