"""Procedural vessel-like images with exact masks, for demos and tests.

Each image is a fundus-like disk: branching random-walk vessels, 1-4 px wide, darker than a
background with low-frequency illumination and noise; pixels outside the circular field of
view are black. Vessels are drawn until they cover a random 9-13 % of the FOV. Every image is
seeded from (seed, split, index), so the same seed gives identical arrays whatever the counts.
With 3 channels the image is tinted like a fundus photograph, so hue augmentation matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mapnet_tune.data.base import Loader, Scan, Split
from mapnet_tune.data.imageops import chw, match_channels, scale_intensity, stack
from mapnet_tune.data.options import Option, choice, counts, integer
from mapnet_tune.errors import UserError

SPLITS = ("train", "val", "test")
COVERAGE = (0.09, 0.13)  # vessel fraction of the FOV, drawn per image
TINT = (0.95, 0.55, 0.30)  # reddish fundus colour per RGB channel
MAX_BRANCHES = 400

OPTIONS = {
    "size": Option(64, integer(16), "side of the square images"),
    "channels": Option(1, choice(1, 3), "1 (grey) or 3 (tinted colour)"),
    "count": Option((48, 16, 16), counts(SPLITS), "images per split, train/val/test"),
    "seed": Option(0, integer(0), "seed of the generator"),
}


def scan(source: Path | None, options: dict) -> Scan:
    """A generated dataset has no input files."""
    if source is not None:
        raise UserError("dataset synthetic is generated and takes no source; drop --source")
    return Scan(None, {})


def build(scanned: Scan, options: dict) -> tuple[dict[str, Split], dict]:
    """Generate the three splits."""
    splits = {}
    for split_index, (name, count) in enumerate(zip(SPLITS, options["count"], strict=True)):
        samples = [
            vessel_image(
                np.random.default_rng([options["seed"], split_index, i]),
                options["size"],
                options["channels"],
            )
            for i in range(count)
        ]
        splits[name] = Split(
            images=np.stack([image for image, _, _ in samples]),
            masks=np.stack([mask[None] for _, mask, _ in samples]),
            fov=np.stack([fov[None] for _, _, fov in samples]),
            names=tuple(f"synthetic-{name}-{i:04d}" for i in range(count)),
        )
    return splits, {"intensity": "unit", "notes": ["procedural vessel-like images"]}


def preprocess(settings: dict, images: list[np.ndarray]) -> np.ndarray:
    """8-bit images are divided by 255; float images are taken as already in [0, 1]."""
    return stack(
        [
            chw(
                scale_intensity(
                    match_channels(image, settings["channels"]),
                    "uint8" if image.dtype == np.uint8 else "unit",
                )
            )
            for image in images
        ]
    )


def vessel_image(
    rng: np.random.Generator, size: int, channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample: float32 (C, size, size) image, uint8 vessel mask and uint8 FOV disk."""
    fov = np.zeros((size, size), np.uint8)
    centre, radius = (size - 1) / 2, 0.46 * size
    cv2.circle(fov, (round(centre), round(centre)), round(radius), 1, thickness=-1)
    mask, darkness = _vessels(rng, fov, centre, radius)
    image = _illumination(rng, size) * (1.0 - darkness)
    image = cv2.GaussianBlur(image, (3, 3), 0.5)
    planes = [image * tint for tint in TINT] if channels == 3 else [image]
    noisy = [p + rng.normal(0.0, 0.025, p.shape).astype(np.float32) for p in planes]
    stacked = np.clip(np.stack(noisy), 0.0, 1.0) * fov
    return stacked.astype(np.float32), mask & fov, fov


@dataclass
class _Canvas:
    """The vessel tree being drawn: mask, darkness, geometry and branches still to grow."""

    mask: np.ndarray
    darkness: np.ndarray
    centre: float
    radius: float
    step: float
    need: float
    queue: list[tuple[np.ndarray, float, int, float]] = field(default_factory=list)

    def full(self) -> bool:
        return np.count_nonzero(self.mask) >= self.need


def _vessels(
    rng: np.random.Generator, fov: np.ndarray, centre: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Branching random walks from an optic-disc point until they cover the target fraction."""
    canvas = _Canvas(
        mask=np.zeros_like(fov),
        darkness=np.zeros(fov.shape, np.float32),
        centre=centre,
        radius=radius,
        step=max(2.0, fov.shape[0] / 24),
        need=rng.uniform(*COVERAGE) * np.count_nonzero(fov),
    )
    angle = rng.uniform(0, 2 * np.pi)
    disc = np.array([centre, centre]) + 0.3 * radius * np.array([np.cos(angle), np.sin(angle)])
    for _ in range(MAX_BRANCHES):
        if canvas.full():
            break
        if not canvas.queue:
            trunk = (
                disc,
                rng.uniform(0, 2 * np.pi),
                int(rng.integers(2, 5)),
                rng.uniform(0.25, 0.45),
            )
            canvas.queue.append(trunk)
        _walk(rng, canvas, canvas.queue.pop(int(rng.integers(len(canvas.queue)))))
    return canvas.mask, canvas.darkness


def _walk(rng: np.random.Generator, canvas: _Canvas, branch: tuple) -> None:
    """Draw one branch as a wandering polyline, queueing thinner side branches along it.

    Stops early once the tree covers its target, so the last branch does not overshoot.
    """
    point, heading, width, contrast = branch
    for _ in range(int(rng.integers(8, 24))):
        heading += rng.normal(0.0, 0.25)
        following = point + canvas.step * np.array([np.cos(heading), np.sin(heading)])
        if np.hypot(*(following - canvas.centre)) > canvas.radius or canvas.full():
            return
        a, b = tuple(np.round(point).astype(int)), tuple(np.round(following).astype(int))
        cv2.line(canvas.mask, a, b, 1, thickness=width)
        cv2.line(canvas.darkness, a, b, contrast, thickness=width)
        if rng.random() < 0.15:
            side = rng.choice((-1.0, 1.0)) * rng.uniform(0.4, 1.1)
            thinner = max(1, width - int(rng.integers(0, 2)))
            branch = (following, heading + side, thinner, contrast * rng.uniform(0.8, 1.0))
            canvas.queue.append(branch)
        point = following


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth background in about [0.4, 0.8]: a few low-frequency waves."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    field = np.zeros((size, size), np.float32)
    for _ in range(3):
        fy, fx = rng.uniform(-1.2, 1.2, 2)
        field += np.cos(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
    return (0.6 + 0.2 * field / 3).astype(np.float32)


LOADER = Loader(
    name="synthetic",
    summary="procedural vessel-like images with a field of view (no source)",
    options=OPTIONS,
    scan=scan,
    build=build,
    preprocess=preprocess,
)
