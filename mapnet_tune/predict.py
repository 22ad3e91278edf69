"""Using a saved model on new images: load it from a file or the registry, predict, write files.

A model is used the way it was trained: the preprocessing, the protocol (whole image or
sliding window), the window, the stride and the threshold all come from its card, through the
:class:`~mapnet_tune.predictor.Predictor` that the registered MLflow model runs too.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mapnet_tune import checkpoint
from mapnet_tune.data import read_image
from mapnet_tune.errors import UserError
from mapnet_tune.names import CHECKPOINT_ARTIFACT, MODEL_FORMAT_TAG, SERVABLE_FORMAT
from mapnet_tune.predictor import Predictor


def load_predictor(
    ref: str, tracking_uri: str | None = None, device: str | None = None
) -> tuple[Predictor, str]:
    """A model from a checkpoint file or a registered ``models:/NAME@ALIAS|VERSION`` URI.

    A registered version is loaded as the MLflow pyfunc model it is logged as, through the
    same code that ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run; versions
    registered before servable models are read through the checkpoint their run carries.

    Args:
        ref: A ``.pt`` path or a registry URI.
        tracking_uri: The MLflow store holding the registry (see ``tracking``).
        device: torch device; default CUDA when present.

    Returns:
        (the predictor, a label for messages).

    Raises:
        UserError: For an unknown model, alias or version, or one that cannot be loaded.
    """
    if not ref.startswith("models:/"):
        model, card = checkpoint.load(ref)
        return Predictor(model, card, device), ref
    from mapnet_tune.tracking import Tracker

    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    info = tracker.resolve_model(ref)
    if info.tags.get(MODEL_FORMAT_TAG) == SERVABLE_FORMAT:
        try:
            predictor = tracker.load_predictor(f"models:/{info.name}/{info.version}")
        except Exception as exc:  # MLflow, the model folder and torch each raise their own
            raise UserError(
                f"{info.label} cannot be loaded as an MLflow model "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); register "
                f"it again with `mapnet-tune retrain-best --force`"
            ) from None
        return predictor.to(device), info.label
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
    return Predictor(model, card, device), info.label


def predict_files(
    ref: str,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    tta: bool = False,
    batch_size: int = 8,
    prob_format: str = "png",
    tracking_uri: str | None = None,
    device: str | None = None,
) -> str:
    """Write a probability map and a binary mask for each image, at the image's own size.

    Args:
        ref: A checkpoint path or a registry URI (see :func:`load_predictor`).
        images: Image files.
        out: Output folder: ``<stem>_prob.png`` (probability x 255) or ``<stem>_prob.tif``
            (float32 probabilities), and ``<stem>_mask.png`` (0 or 255) per image.
        tta: Average over flips (identity, horizontal, vertical, both).
        batch_size: Images per forward pass.
        prob_format: ``png`` (8-bit, probability x 255, for viewing) or ``tiff`` (float32,
            the exact probabilities, for analysis).
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
    predictor, label = load_predictor(ref, tracking_uri, device)
    raw = [read_image(path) for path in paths]
    results = predictor.predict(raw, names=[str(p) for p in paths], tta=tta, batch_size=batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, result in zip(paths, results, strict=True):
        if prob_format == "tiff":
            Image.fromarray(result.probability, mode="F").save(out / f"{path.stem}_prob.tif")
        else:
            prob = np.round(np.clip(result.probability, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(prob).save(out / f"{path.stem}_prob.png")
        Image.fromarray(result.mask * 255).save(out / f"{path.stem}_mask.png")
    evaluation = predictor.card.evaluation
    print(
        f"{label}: {evaluation.describe()}, threshold {evaluation.threshold:g}"
        f"{', flip TTA' if tta else ''}",
        file=sys.stderr,
    )
    return f"wrote {len(paths)} probability map(s) and mask(s) to {out}"
