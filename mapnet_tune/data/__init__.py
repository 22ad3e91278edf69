"""Datasets: validate a source in its official layout, preprocess it as published, cache it.

Usage::

    data = prepare("drive", "/data/DRIVE")
    print(data.card())
    x = preprocess_images(data.settings, [read_image("new.tif")])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from mapnet_tune.data import cache, drive, folder, isic, lung, synthetic
from mapnet_tune.data.base import Loader, PreparedDataset, Scan, Split
from mapnet_tune.data.io import read_image
from mapnet_tune.data.options import resolve
from mapnet_tune.errors import UserError
from mapnet_tune.settings import default_cache_dir

__all__ = [
    "DATASETS",
    "Loader",
    "PreparedDataset",
    "Split",
    "dataset_names",
    "fingerprint",
    "get_loader",
    "prepare",
    "preprocess_images",
    "raw_example",
    "read_image",
    "remember_source",
]

log = logging.getLogger(__name__)

DATASETS: dict[str, Loader] = {
    module.LOADER.name: module.LOADER for module in (drive, isic, lung, synthetic, folder)
}


def dataset_names() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(DATASETS)


def get_loader(name: str) -> Loader:
    """The loader registered under ``name``.

    Raises:
        UserError: For an unknown name, listing the valid ones.
    """
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(
            f"unknown dataset '{name}'; valid datasets: {', '.join(dataset_names())}"
        ) from None


def prepare(
    name: str,
    source: str | Path | None,
    options: dict | None = None,
    cache_dir: Path | None = None,
) -> PreparedDataset:
    """Validate, preprocess and cache a dataset, or load it from the cache.

    The cache entry is keyed by a fingerprint of the input files' contents and the options, so
    a second call with unchanged files and options only hashes the files and loads arrays.

    Args:
        name: A registered dataset name (see :func:`dataset_names`).
        source: The dataset folder in its official layout; None for ``synthetic``, or to use
            the folder last given to :func:`remember_source` (``mapnet-tune prepare``).
        options: Dataset options (see each module's ``OPTIONS``); missing ones take defaults.
        cache_dir: Cache folder; default $MAPNET_TUNE_CACHE or ./.mapnet-tune/cache.

    Returns:
        The prepared dataset.

    Raises:
        UserError: For an unknown dataset or option, a bad layout or a bad file. Nothing is
            written to the cache in that case.
    """
    started = time.perf_counter()
    loader = get_loader(name)
    resolved = resolve(name, loader.options, options)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root, scanned, fp = _scan(name, source, resolved, cache_dir)
    origin = str(root.resolve()) if root is not None else f"mapnet-tune's {name} generator"
    cached = cache.load(cache_dir, name, fp)
    if cached is not None:
        log.info("loaded %s %s from the cache in %.1f s", name, fp, time.perf_counter() - started)
        return dataclasses.replace(cached, source=origin)
    splits, derived = loader.build(scanned, resolved)
    # A JSON round trip makes a fresh dataset's settings equal to a cached one's (tuples become
    # lists) and proves they can be recorded with a model.
    settings = json.loads(json.dumps({"dataset": name, **resolved, **derived}))
    dataset = PreparedDataset(name, fp, splits["train"].images.shape[1], splits, settings, origin)
    entry = cache.save(cache_dir, dataset)
    log.info("prepared %s into %s in %.1f s", name, entry, time.perf_counter() - started)
    return dataset


def fingerprint(
    name: str, source: str | Path | None, options: dict | None = None, cache_dir: Path | None = None
) -> str:
    """The fingerprint :func:`prepare` would give, from the files alone (nothing is built).

    Raises:
        UserError: As :func:`prepare` does for an unknown dataset, option or a bad layout.
    """
    resolved = resolve(name, get_loader(name).options, options)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _scan(name, source, resolved, cache_dir)[2]


def _scan(
    name: str, source: str | Path | None, resolved: dict, cache_dir: Path
) -> tuple[Path | None, Scan, str]:
    """The source folder (or the remembered one), its checked layout and its fingerprint."""
    if source is None:
        source = _remembered_sources(cache_dir).get(name)
    root = Path(source).expanduser() if source is not None else None
    scanned = get_loader(name).scan(root, resolved)
    return root, scanned, cache.fingerprint(name, resolved, scanned)


def _sources_file(cache_dir: Path) -> Path:
    return cache_dir / "sources.json"


def _remembered_sources(cache_dir: Path) -> dict[str, str]:
    try:
        return json.loads(_sources_file(cache_dir).read_text())
    except (OSError, ValueError):
        return {}


def remember_source(name: str, source: str | Path, cache_dir: Path | None = None) -> None:
    """Record where a dataset was prepared from, so later commands need no ``--source``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sources = _remembered_sources(cache_dir)
    sources[name] = str(Path(source).expanduser().resolve())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = _sources_file(cache_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(sources, indent=1, sort_keys=True))
    tmp.replace(_sources_file(cache_dir))


def preprocess_images(settings: dict, images: list[np.ndarray]) -> np.ndarray:
    """Preprocess new raw images the way a prepared dataset was, for prediction.

    Args:
        settings: ``PreparedDataset.settings`` as recorded with a model.
        images: Raw (H, W) or (H, W, C) arrays as read from disk (see :func:`read_image`), all
            of one size.

    Returns:
        float32 (N, C, H, W) model input.

    Raises:
        UserError: For unknown settings, no images, or images of different sizes.
    """
    if not images:
        raise UserError("no images to preprocess")
    if "dataset" not in settings:
        raise UserError("these settings do not name their dataset; record PreparedDataset.settings")
    return get_loader(settings["dataset"]).preprocess(settings, images)


def raw_example(data: PreparedDataset, side: int = 32) -> np.ndarray:
    """A small centre crop of a raw training image, as a user would send it to a model.

    Read from the dataset's first source file; a generated dataset has none, so its generator
    draws one at 8 bits per channel.

    Args:
        data: The prepared dataset.
        side: The crop's side (smaller images are taken whole).
    """
    loader = get_loader(data.name)
    root = Path(data.source)
    if root.is_dir():
        options = {key: data.settings[key] for key in loader.options}
        scanned = loader.scan(root, resolve(data.name, loader.options, options))
        image = read_image(next(item[0] for items in scanned.groups.values() for item in items))
    else:
        planes = synthetic.vessel_image(np.random.default_rng(0), side, data.channels)[0]
        image = np.round(planes * 255).astype(np.uint8)
        image = image[0] if data.channels == 1 else np.moveaxis(image, 0, -1)
    height, width = image.shape[:2]
    crop = min(side, height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(image[top : top + crop, left : left + crop])
