"""Training augmentation built from a trial's sampled values with albumentations."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import albumentations as A
import numpy as np
import torch

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
        A function ``(image CHW float32, masks KHW) -> (image, masks)`` or None.
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
        transforms.append(
            A.HueSaturationValue(hue_shift_limit=limit, sat_shift_limit=0, val_shift_limit=0, p=0.5)
        )
    if params.get("brightness", 0) > 0 or params.get("contrast", 0) > 0:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=float(params.get("brightness", 0)),
                contrast_limit=float(params.get("contrast", 0)),
                p=0.5,
            )
        )
    if not transforms:
        return None
    pipeline = A.Compose(transforms, seed=seed)

    def augment(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # albumentations works on HWC; the model's arrays are CHW. Each mask channel (the
        # target, and the valid pixels of a padded whole image) moves with the image.
        out = pipeline(image=np.ascontiguousarray(image.transpose(1, 2, 0)), masks=list(mask))
        img = out["image"]
        img = img[:, :, None] if img.ndim == 2 else img
        return np.clip(img, 0.0, 1.0).transpose(2, 0, 1), np.stack(out["masks"])

    return augment


class BatchAugment:
    """The transforms of :func:`build_augment`, applied to whole batches on their device.

    Same parameters and the same distributions as the albumentations pipeline (each sample
    draws its own flips, rotation, hue shift and brightness/contrast), so a trial means the
    same thing on the CPU path and on the GPU path; only the random stream differs. The
    hue shift is continuous here, where albumentations rounds through uint8.

    Args:
        params: Sampled or fixed hyperparameters (keys as in ``config.HYPERPARAMETERS``).
        channels: Input channels; hue needs 3.
        seed: Seeds the generator on the batch's device.
    """

    def __init__(self, params: Mapping[str, float], channels: int, seed: int) -> None:
        self.flip_p = float(params.get("flip_p", 0))
        self.rot90_p = float(params.get("rot90_p", 0))
        self.hue = float(params.get("hue_shift", 0))
        self.brightness = float(params.get("brightness", 0))
        self.contrast = float(params.get("contrast", 0))
        if self.hue and channels != 3:
            raise ValueError("hue_shift needs 3-channel input")
        self.seed = seed
        self.generator: torch.Generator | None = None

    def _uniform(self, n: int, device: torch.device) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(n, generator=self.generator, device=device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment images ``x`` (B, C, H, W) in [0, 1] and masks ``y`` (B, 1, H, W) alike."""
        n, dev = len(x), x.device
        for dim in (-1, -2):  # horizontal, then vertical flip, each with its own draw
            if self.flip_p > 0:
                pick = _per_sample(self._uniform(n, dev) < self.flip_p)
                x, y = torch.where(pick, x.flip(dim), x), torch.where(pick, y.flip(dim), y)
        if self.rot90_p > 0:
            apply = self._uniform(n, dev) < self.rot90_p
            k = torch.where(apply, (self._uniform(n, dev) * 4).long().clamp(max=3), 0)
            x, y = _rot90(x, k), _rot90(y, k)
        if self.hue > 0:
            apply = self._uniform(n, dev) < 0.5
            shift = (self._uniform(n, dev) * 2 - 1) * self.hue * apply
            x = _shift_hue(x, shift * 2.0)  # OpenCV's 0-180 hue scale -> degrees
        if self.brightness > 0 or self.contrast > 0:
            apply = _per_sample(self._uniform(n, dev) < 0.5)
            alpha = _per_sample(1 + (self._uniform(n, dev) * 2 - 1) * self.contrast)
            beta = _per_sample((self._uniform(n, dev) * 2 - 1) * self.brightness)
            x = torch.where(apply, x * alpha + beta, x)
        return x.clamp(0.0, 1.0), y


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values[:, None, None, None]


def _rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each sample counter-clockwise by its own k*90 degrees (np.rot90's sense)."""
    out = x
    for turns in (1, 2, 3):
        out = torch.where(_per_sample(k == turns), torch.rot90(x, turns, (-2, -1)), out)
    return out


def _shift_hue(rgb: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by per-sample ``degrees`` (HSV round trip)."""
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(1)
    low, _ = rgb.min(1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == r,
        ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + degrees[:, None, None] / 60.0) % 6
    # HSV -> RGB: channel n is V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + H) mod 6.
    ramps = [((n + hue) % 6) for n in (5, 3, 1)]
    return torch.stack([value - chroma * torch.minimum(k, 4 - k).clamp(0, 1) for k in ramps], 1)


def augmentation_for(
    params: Mapping[str, float], channels: int, seed: int, device: torch.device
) -> Augment | BatchAugment | None:
    """The augmentation a trial trains with: batched on a CUDA device, albumentations elsewhere.

    On a GPU, per-sample albumentations on the CPU would starve the card; on the CPU the
    albumentations pipeline is the reference implementation.
    """
    pipeline = build_augment(params, channels, seed)
    if pipeline is not None and device.type == "cuda":
        return BatchAugment(params, channels, seed)
    return pipeline
