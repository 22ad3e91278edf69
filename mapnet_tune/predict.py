"""Using a saved model on new images: load it from a file or the registry, predict, write PNGs.

A model is used the way it was trained: the preprocessing, the protocol (whole image or
sliding window), the window and the stride all come from what was recorded with it, never
from guesses about the new images.
"""

from __future__ import annotations

import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from mapnet_tune import checkpoint, engine
from mapnet_tune.data import preprocess_images, read_image
from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet

#: Where retrain-best stores the weights-only checkpoint in a registered version's run.
CHECKPOINT_ARTIFACT = "checkpoint/mapnet.pt"
THRESHOLD = 0.5


def load_model(ref: str, tracking_uri: str | None = None) -> tuple[MAPNet, dict[str, Any], str]:
    """A model from a checkpoint file or a registered ``models:/NAME@ALIAS|VERSION`` URI.

    Args:
        ref: A ``.pt`` path or a registry URI.
        tracking_uri: The MLflow store holding the registry (see ``tracking``).

    Returns:
        (model in eval mode on the CPU, its recorded metadata, a label for messages).

    Raises:
        UserError: For an unknown model, alias or version, or one that cannot be loaded.
    """
    if not ref.startswith("models:/"):
        model, meta = checkpoint.load(ref)
        return model, meta, ref
    from mapnet_tune.tracking import Tracker

    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    info = tracker.resolve_model(ref)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.download(info.run_id, CHECKPOINT_ARTIFACT, tmp)
        if path is None:
            raise UserError(
                f"{info.label} cannot be loaded: its run {info.run_id} has no "
                f"{CHECKPOINT_ARTIFACT}; register models with `mapnet-tune "
                f"retrain-best`"
            )
        try:
            model, meta = checkpoint.load(path)
        except UserError:
            raise UserError(
                f"{info.label} cannot be loaded: {CHECKPOINT_ARTIFACT} in run "
                f"{info.run_id} is damaged or not a mapnet-tune checkpoint; "
                f"register the model again with `mapnet-tune retrain-best "
                f"--force`"
            ) from None
    return model, meta, info.label


def predict_files(
    ref: str,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    tta: bool = False,
    batch_size: int = 8,
    tracking_uri: str | None = None,
    device: str | None = None,
) -> str:
    """Write a probability map and a binary mask PNG for each image, at the image's own size.

    Images of any size are preprocessed as recorded with the model; where that changes their
    size (ISIC and lung resize), the probabilities are resized back. Images that share a size
    go through the model together, ``batch_size`` at a time.

    Args:
        ref: A checkpoint path or a registry URI (see :func:`load_model`).
        images: Image files.
        out: Output folder: ``<stem>_prob.png`` (probability x 255) and ``<stem>_mask.png``
            (0 or 255) per image.
        tta: Average over flips (identity, horizontal, vertical, both).
        batch_size: Images per forward pass.
        tracking_uri: The MLflow store for registry URIs.
        device: torch device; default CUDA when present.

    Returns:
        A summary for the user.

    Raises:
        UserError: No images, two images with one name, an unreadable image, or a model that
            cannot be loaded or does not record its preprocessing. Nothing is written then.
    """
    paths = [Path(p) for p in images]
    if not paths:
        raise UserError("predict needs at least one image file")
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise UserError(
                f"{seen[path.stem]} and {path} would both write {path.stem}_*.png; "
                f"predict them into different --out folders"
            )
        seen[path.stem] = path
    model, meta, label = load_model(ref, tracking_uri)
    if "settings" not in meta:
        raise UserError(
            f"{label} does not record the preprocessing it was trained with, so "
            f"new images cannot be prepared for it; retrain it with retrain-best"
        )
    raw = [read_image(path) for path in paths]
    inputs = [preprocess_images(meta["settings"], [image])[0] for image in raw]
    probs = _predict(model, meta, inputs, tta, batch_size, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, image, prob in zip(paths, raw, probs, strict=True):
        height, width = image.shape[:2]
        if prob.shape != (height, width):
            prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        Image.fromarray(np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)).save(
            out / f"{path.stem}_prob.png"
        )
        mask = (prob >= meta.get("threshold", THRESHOLD)).astype(np.uint8) * 255
        Image.fromarray(mask).save(out / f"{path.stem}_mask.png")
    protocol = meta.get("eval_protocol", "full-image")
    print(f"{label}: protocol {protocol}{', flip TTA' if tta else ''}", file=sys.stderr)
    return f"wrote {len(paths)} probability map(s) and mask(s) to {out}"


def _predict(
    model: MAPNet,
    meta: dict[str, Any],
    inputs: list[np.ndarray],
    tta: bool,
    batch_size: int,
    device: str | None,
) -> list[np.ndarray]:
    """(H, W) probabilities per preprocessed (C, H, W) input, batched by size."""
    dev = engine.pick_device(device)
    net = engine.prepare_model(model, dev)
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, x in enumerate(inputs):
        by_size[x.shape].append(index)
    probs: list[np.ndarray | None] = [None] * len(inputs)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = engine.predict(
                net,
                np.stack([inputs[i] for i in chunk]),
                meta.get("eval_protocol", "full-image"),
                window=meta.get("patch_size") or 64,
                stride=meta.get("eval_stride", 16),
                batch_size=meta.get("eval_batch_size", batch_size),
                device=dev,
                tta=tta,
            )
            for i, p in zip(chunk, batch.numpy(), strict=True):
                probs[i] = p[0]
    return probs
