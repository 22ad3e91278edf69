"""Array operations shared by the dataset modules: channels, resizing, intensities, masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mapnet_tune.errors import UserError

# Intensity mappings a dataset can record in its settings (see scale_intensity).
INTENSITY_MODES = ("uint8", "hu", "minmax", "unit")
# BCDU's lung window in Hounsfield units.
HU_WINDOW = (-512.0, 512.0)


def to_grey(image: np.ndarray) -> np.ndarray:
    """Luma Y = 0.299 R + 0.587 G + 0.114 B in float64, without rounding; grey passes through."""
    if image.ndim == 2:
        return image.astype(np.float64)
    rgb = image.astype(np.float64)
    # Written out term by term (not a dot product) so the sums match the published chain.
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """An (H, W) image for 1 channel or an (H, W, 3) image for 3, converting as needed."""
    if channels == 1:
        return to_grey(image) if image.ndim == 3 else image
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to (height, width) with PIL (anti-aliased when shrinking).

    uint8 images are resized as 8-bit images, as ``scipy.misc.imresize`` did; anything else
    per channel in float32.
    """
    if image.shape[:2] == size:
        return image
    box = (size[1], size[0])
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(box, Image.Resampling.BILINEAR))
    planes = image[..., None] if image.ndim == 2 else image
    resized = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(planes[..., c], np.float32)).resize(
                box, Image.Resampling.BILINEAR
            )
        )
        for c in range(planes.shape[2])
    ]
    return resized[0] if image.ndim == 2 else np.stack(resized, axis=2)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a {0, 1} uint8 mask to (height, width)."""
    if mask.shape[:2] == size:
        return mask
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))


def minmax(image: np.ndarray) -> np.ndarray:
    """Min-max over the whole image (all channels together) to [0, 1]; constant images give 0."""
    image = image.astype(np.float32)
    low, high = image.min(), image.max()
    if high <= low:
        return np.zeros_like(image)
    return (image - low) / (high - low)


def choose_intensity(images: list[np.ndarray], allow_hu: bool) -> str:
    """The intensity mapping for a set of raw images, chosen from their dtype and range.

    "uint8" when every image is 8-bit; "hu" (when allowed) when any value is negative, as CT
    slices in Hounsfield units are; otherwise per-image "minmax".
    """
    if all(image.dtype == np.uint8 for image in images):
        return "uint8"
    if allow_hu and any(image.min() < 0 for image in images):
        return "hu"
    return "minmax"


def scale_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Map raw intensities to float32 in [0, 1].

    Modes: "uint8" divides by 255; "hu" clips to [-512, 512] HU and min-maxes per image (BCDU's
    lung mapping, per slice here because 2-D slices have no volume); "minmax" min-maxes per
    image; "unit" clips values already meant to lie in [0, 1].
    """
    if mode == "uint8":
        return image.astype(np.float32) / 255.0
    if mode == "hu":
        return minmax(np.clip(image.astype(np.float32), *HU_WINDOW))
    if mode == "minmax":
        return minmax(image)
    if mode == "unit":
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"unknown intensity mode {mode!r}; expected one of {INTENSITY_MODES}")


def chw(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W) and (H, W, C) -> (C, H, W)."""
    return image[None] if image.ndim == 2 else np.moveaxis(image, 2, 0)


def stack(images: list[np.ndarray]) -> np.ndarray:
    """Stack same-sized (C, H, W) arrays into (N, C, H, W).

    Raises:
        UserError: When the sizes differ, listing them.
    """
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        listed = ", ".join("x".join(map(str, shape[1:])) for shape in shapes)
        raise UserError(f"images have different sizes ({listed}); pass images of one size together")
    return np.ascontiguousarray(np.stack(images))


def single_channel(mask: np.ndarray, path: Path) -> np.ndarray:
    """A mask as (H, W); grey images stored as RGB are accepted.

    Raises:
        UserError: For a mask whose colour channels differ.
    """
    if mask.ndim == 2:
        return mask
    if (mask == mask[..., :1]).all():
        return mask[..., 0]
    raise UserError(f"mask {path} is a colour image; save it as a single-channel greyscale image")


def binary_mask(mask: np.ndarray, path: Path, strict: bool, fix: str = "") -> np.ndarray:
    """A {0, 1} uint8 (H, W) mask from a mask file's array.

    Args:
        mask: The array as read.
        path: The file, for messages.
        strict: Require a binary mask: 0 and at most one other value (255, 1, ...), which is
            foreground. Otherwise threshold: > 127, or > 0 when the maximum is 1.
        fix: Extra advice appended to the error, e.g. how to allow thresholding.

    Raises:
        UserError: For a colour mask, or a non-binary one when ``strict``.
    """
    mask = single_channel(mask, path)
    if strict:
        values = np.unique(mask)
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
            raise UserError(
                f"mask {path} is not binary: it has {len(values)} distinct values ({shown}); "
                "expected 0 for background and one foreground value such as 255; re-save it "
                f"losslessly (PNG, GIF or TIFF, not JPEG){fix}"
            )
        return (mask > 0).astype(np.uint8)
    return (mask > (0 if mask.max() <= 1 else 127)).astype(np.uint8)


def check_same_size(image: np.ndarray, image_path: Path, mask: np.ndarray, mask_path: Path) -> None:
    """Raise UserError naming the mask when its height and width differ from its image's."""
    if image.shape[:2] != mask.shape[:2]:
        raise UserError(
            f"mask {mask_path} is {_hw(mask)} but its image {image_path} is {_hw(image)} "
            "(height x width); a mask must have the size of its image"
        )


def _hw(array: np.ndarray) -> str:
    return f"{array.shape[0]}x{array.shape[1]}"
