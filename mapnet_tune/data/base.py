"""Prepared datasets: the arrays a model is trained and scored on, and how to describe them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapnet_tune.data.options import Option


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a prepared dataset.

    Attributes:
        images: float32 (N, C, H, W), the model input, values in [0, 1].
        masks: uint8 (N, 1, H, W) in {0, 1}, the target the model is trained and scored on.
        fov: uint8 (N, 1, H, W) in {0, 1}, the pixels that are evaluated (DRIVE's field of
            view); None means every pixel.
        names: Source file stem of each image.
        patches: int32 (M, 3) rows (image index, top, left) of training patches in full-image
            coordinates; None means training on whole images.
        patch_size: Side of the square patches, when there are patches.
        extras: Additional per-image arrays, (N, 1, H, W) each, e.g. the lung masks and body
            FOV that the legacy lung evaluation needs.
        groups: The group of each image (the lung set's patient ID): images of one group are
            never on both sides of a cross-validation fold. None: every image is its own group.
    """

    images: np.ndarray
    masks: np.ndarray
    fov: np.ndarray | None
    names: tuple[str, ...]
    patches: np.ndarray | None = None
    patch_size: int | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n, _, h, w = self.images.shape
        if self.images.dtype != np.float32 or self.masks.dtype != np.uint8:
            raise ValueError("Split needs float32 images and uint8 masks")
        arrays = {"masks": self.masks, "fov": self.fov, **self.extras}
        for key, array in arrays.items():
            if array is not None and array.shape != (n, 1, h, w):
                raise ValueError(f"Split {key} has shape {array.shape}, expected {(n, 1, h, w)}")
        if len(self.names) != n:
            raise ValueError(f"Split has {n} images but {len(self.names)} names")
        if self.groups is not None and len(self.groups) != n:
            raise ValueError(f"Split has {n} images but {len(self.groups)} groups")
        if (self.patches is None) != (self.patch_size is None):
            raise ValueError("Split patches and patch_size go together")

    @property
    def image_groups(self) -> tuple[str, ...]:
        """The group of each image: its recorded group, or its own name."""
        return self.groups if self.groups is not None else self.names

    def positive_fraction(self) -> float:
        """Fraction of evaluated pixels (inside the FOV when there is one) that are positive."""
        if self.fov is None:
            return float(self.masks.mean())
        inside = np.count_nonzero(self.fov)
        return float(np.count_nonzero(self.masks & self.fov) / inside) if inside else float("nan")


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    """A validated, preprocessed dataset with the settings that made it.

    Attributes:
        name: Registry name of the dataset ("drive", "isic", ...).
        fingerprint: 16 hex characters identifying the input files and the settings.
        channels: Number of input channels.
        splits: "train", "val" and, when the source has one, "test".
        settings: The preprocessing settings used (JSON-serialisable), recorded with models so
            that prediction repeats the same preprocessing.
        source: Where the files came from (the folder), or which generator made them; runs
            record it with their dataset input.
    """

    name: str
    fingerprint: str
    channels: int
    splits: dict[str, Split]
    settings: dict
    source: str = ""

    def card(self) -> str:
        """The dataset card as printed text: settings and, per split, counts, sizes, positives."""
        plural = "s" if self.channels > 1 else ""
        rows = [
            ("dataset", self.name),
            ("fingerprint", self.fingerprint),
            ("channels", f"{self.channels} channel{plural}"),
            ("settings", _describe_settings(self.settings)),
        ]
        for split_name in ("train", "val", "test"):
            split = self.splits.get(split_name)
            rows.append((split_name, _describe_split(split) if split else "none"))
        rows += [("note", note) for note in self.settings.get("notes", [])]
        lines = [f"{label:<12}{text}" for label, text in rows]
        return "\n".join(lines)


def _describe_split(split: Split) -> str:
    n, _, h, w = split.images.shape
    where = "inside the FOV" if split.fov is not None else "of all pixels"
    text = f"{n} image{'s' if n != 1 else ''} {h}x{w}"
    if split.patches is not None:
        size = split.patch_size
        text += f", {len(split.patches):,} training patches {size}x{size}"
    return text + f", positive {100 * split.positive_fraction():.2f} % {where}"


def _describe_settings(settings: Mapping) -> str:
    def show(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, list | tuple):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return str(value)

    return " ".join(f"{k}={show(v)}" for k, v in settings.items() if k not in ("notes", "dataset"))


@dataclass(frozen=True)
class Scan:
    """The input files of a dataset source, grouped and paired, found before any reading.

    Attributes:
        root: The source folder (None for generated datasets).
        groups: Named groups (e.g. "training", "test") of file tuples, one tuple per image,
            e.g. (image, manual segmentation, FOV mask).
    """

    root: Path | None
    groups: dict[str, list[tuple[Path, ...]]]

    @property
    def files(self) -> list[Path]:
        """Every input file, in group order."""
        return [path for items in self.groups.values() for item in items for path in item]


@dataclass(frozen=True)
class Loader:
    """What the registry knows about one dataset.

    Attributes:
        name: Registry name.
        summary: One line for listings.
        options: Option name -> spec.
        scan: ``scan(source, options)`` validates the layout and pairs the files.
        build: ``build(scan, options)`` reads and preprocesses; returns the splits and the
            derived settings (statistics, modes) to record.
        preprocess: ``preprocess(settings, images)`` applies the same preprocessing to new
            raw images at prediction time.
    """

    name: str
    summary: str
    options: dict[str, Option]
    scan: Callable[[Path | None, dict], Scan]
    build: Callable[[Scan, dict], tuple[dict[str, Split], dict]]
    preprocess: Callable[[dict, list[np.ndarray]], np.ndarray]
