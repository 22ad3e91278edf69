"""Training augmentation built from a trial's sampled values with albumentations."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import albumentations as A
import numpy as np

Augment = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def build_augment(params: Mapping[str, float], channels: int, seed: int) -> Augment | None:
    """An image-and-mask augmentation for the given hyperparameters, or None when all are off.

    Flips use ``flip_p`` for the horizontal and the vertical flip independently (the seed
    report's recipe), ``rot90_p`` a rotation by k*90 degrees with k uniform in {0,..,3}.
    ``hue_shift`` is a limit in OpenCV hue units (0-180 scale), applied with p=0.5;
    ``brightness`` and ``contrast`` are RandomBrightnessContrast limits, applied with p=0.5.

    Args:
        params: Sampled or fixed hyperparameters (keys as in ``config.HYPERPARAMETERS``).
        channels: Input channels; hue needs 3.
        seed: Seeds albumentations so a trial's augmentation stream is reproducible.

    Returns:
        A function ``(image CHW float32, mask 1HW uint8) -> (image, mask)`` or None.
    """
    transforms: list[A.BasicTransform] = []
    if params.get("flip_p", 0) > 0:
        transforms += [A.HorizontalFlip(p=params["flip_p"]), A.VerticalFlip(p=params["flip_p"])]
    if params.get("rot90_p", 0) > 0:
        transforms.append(A.RandomRotate90(p=params["rot90_p"]))
    if params.get("hue_shift", 0) > 0:
        if channels != 3:
            raise ValueError("hue_shift needs 3-channel input")
        limit = float(params["hue_shift"])
        transforms.append(A.HueSaturationValue(hue_shift_limit=limit, sat_shift_limit=0,
                                               val_shift_limit=0, p=0.5))
    if params.get("brightness", 0) > 0 or params.get("contrast", 0) > 0:
        transforms.append(A.RandomBrightnessContrast(
            brightness_limit=float(params.get("brightness", 0)),
            contrast_limit=float(params.get("contrast", 0)), p=0.5))
    if not transforms:
        return None
    pipeline = A.Compose(transforms, seed=seed)

    def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # albumentations works on HWC; the model's arrays are CHW.
        out = pipeline(image=np.ascontiguousarray(image.transpose(1, 2, 0)), mask=mask[0])
        img = out["image"]
        img = img[:, :, None] if img.ndim == 2 else img
        return np.clip(img, 0.0, 1.0).transpose(2, 0, 1), out["mask"][None]

    return augment
