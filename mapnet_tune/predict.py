"""Using a saved model on new images: load it from a file or the registry, predict, write PNGs.

A model is used the way it was trained: the preprocessing, the protocol (whole image or
sliding window), the window and the stride all come from what was recorded with it, never
from guesses about the new images.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from mapnet_tune import checkpoint, engine
from mapnet_tune.data import preprocess_images, read_image
from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet
from mapnet_tune.modelcard import ModelCard
from mapnet_tune.names import CHECKPOINT_ARTIFACT


def load_model(ref: str, tracking_uri: str | None = None) -> tuple[MAPNet, ModelCard, str]:
    """A model from a checkpoint file or a registered ``models:/NAME@ALIAS|VERSION`` URI.

    Args:
        ref: A ``.pt`` path or a registry URI.
        tracking_uri: The MLflow store holding the registry (see ``tracking``).

    Returns:
        (model in eval mode on the CPU, its model card, a label for messages).

    Raises:
        UserError: For an unknown model, alias or version, or one that cannot be loaded.
    """
    if not ref.startswith("models:/"):
        model, card = checkpoint.load(ref)
        return model, card, ref
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
            model, card = checkpoint.load(path)
        except UserError:
            raise UserError(
                f"{info.label} cannot be loaded: {CHECKPOINT_ARTIFACT} in run "
                f"{info.run_id} is damaged or not a mapnet-tune checkpoint; "
                f"register the model again with `mapnet-tune retrain-best "
                f"--force`"
            ) from None
    return model, card, info.label


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
            cannot be loaded. Nothing is written then.
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
    model, card, label = load_model(ref, tracking_uri)
    raw = [read_image(path) for path in paths]
    inputs = [preprocess_images(card.preprocessing, [image])[0] for image in raw]
    probs = _predict(model, card, inputs, tta, batch_size, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, image, prob in zip(paths, raw, probs, strict=True):
        height, width = image.shape[:2]
        if prob.shape != (height, width):
            prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        Image.fromarray(np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)).save(
            out / f"{path.stem}_prob.png"
        )
        mask = (prob >= card.evaluation.threshold).astype(np.uint8) * 255
        Image.fromarray(mask).save(out / f"{path.stem}_mask.png")
    print(f"{label}: {card.evaluation.describe()}{', flip TTA' if tta else ''}", file=sys.stderr)
    return f"wrote {len(paths)} probability map(s) and mask(s) to {out}"


def _predict(
    model: MAPNet,
    card: ModelCard,
    inputs: list[np.ndarray],
    tta: bool,
    batch_size: int,
    device: str | None,
) -> list[np.ndarray]:
    """(H, W) probabilities per preprocessed (C, H, W) input, batched by size.

    Full-image models take ``batch_size`` images per pass; sliding-window models take one
    image at a time and batch their windows as recorded on the card.
    """
    dev = engine.pick_device(device)
    net = engine.prepare_model(model, dev)
    evaluation = card.evaluation
    if evaluation.protocol == "full-image":
        evaluation = dataclasses.replace(evaluation, batch_size=batch_size)
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
                evaluation,
                device=dev,
                tta=tta,
            )
            for i, p in zip(chunk, batch.numpy(), strict=True):
                probs[i] = p[0]
    return probs
