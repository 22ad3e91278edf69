"""What the registered model takes and gives, and the code it carries.

The registered MLflow model (``tracking.pyfunc``) is a thin shell: it turns whatever a caller
sends into images (:func:`decode_inputs`), hands them to the
:class:`~mapnet_tune.predictor.Predictor`, and turns the results into plain arrays
(:func:`encode_outputs`). Nothing here imports MLflow.

Inputs, in process or over HTTP:

- one image: a uint8 (H, W) or (H, W, C) array, or the bytes of a PNG or TIFF file;
- a batch of images of any sizes: a list, a 1-D object array, or a column ``image`` of a
  DataFrame whose cells are arrays, file bytes or base64 text (what ``mlflow models serve``
  hands over for ``{"inputs": ["<base64 PNG>", ...]}``); or an (N, H, W, C) array.

Outputs: for one image ``{"probability": float32 (H, W), "mask": uint8 (H, W)}``; for a batch,
a list of those, in order.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mapnet_tune.data.io import decode_image
from mapnet_tune.errors import UserError
from mapnet_tune.predictor import Prediction

#: The DataFrame column (and dict key) that holds images.
IMAGE_COLUMN = "image"

#: The package's modules the registered model runs, relative to the package: prediction and
#: what it imports (the data package for preprocessing, the engine for the protocols, the
#: tracking package for the MLflow shell). Only these travel with the model.
SERVED_CODE = (
    "__init__.py",
    "errors.py",
    "metrics.py",
    "modelcard.py",
    "names.py",
    "predictor.py",
    "serving.py",
    "settings.py",
    "config",
    "data",
    "engine",
    "model",
    "tracking",
)


class ImageInputError(UserError):
    """An input that is not an image the model can take; the message names it and the fix."""


def decode_inputs(model_input: Any) -> tuple[list[np.ndarray], bool]:
    """The images in a request, and whether it was one image (not a batch).

    Raises:
        ImageInputError: For anything that is not an image or a batch of images.
    """
    if hasattr(model_input, "columns"):  # a pandas DataFrame: one image per row
        columns = list(model_input.columns)
        column = IMAGE_COLUMN if IMAGE_COLUMN in columns else columns[0] if columns else None
        if column is None or (len(columns) > 1 and IMAGE_COLUMN not in columns):
            raise ImageInputError(
                f"a table of images needs one column, or a column named '{IMAGE_COLUMN}'; "
                f"this one has {columns}"
            )
        return _items(list(model_input[column])), False
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
        return decode_inputs(model_input[IMAGE_COLUMN])
    if isinstance(model_input, bytes | str):
        return [_decode(model_input, "the image")], True
    if isinstance(model_input, list | tuple):
        return _items(list(model_input)), False
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object or model_input.dtype.kind in "SU":
            if model_input.ndim == 1:
                return _items(list(model_input)), False
            return [_decode(model_input, "the image")], True  # nested lists from JSON
        if model_input.ndim == 4:
            return [_decode(image, f"image {i + 1}") for i, image in enumerate(model_input)], False
        return [_decode(model_input, "the image")], True
    raise ImageInputError(
        f"cannot read images from a {type(model_input).__name__}; send an (H, W) or (H, W, C) "
        f"uint8 array, a list of them, or PNG/TIFF bytes (base64 in JSON)"
    )


def _items(items: Sequence[Any]) -> list[np.ndarray]:
    if not items:
        raise ImageInputError("the request holds no images; send at least one")
    return [_decode(item, f"image {i + 1}") for i, item in enumerate(items)]


def _decode(item: Any, name: str) -> np.ndarray:
    """One image from an array, nested lists, file bytes or base64 text."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError(
                f"{name} is text but not base64; send PNG or TIFF bytes base64-encoded"
            ) from None
    if isinstance(item, bytes | bytearray):
        try:
            return decode_image(io.BytesIO(bytes(item)))
        except UserError:
            raise ImageInputError(
                f"{name} is damaged, truncated or not an image file; send intact PNG or TIFF bytes"
            ) from None
    try:
        # Nested lists from JSON arrive as object arrays; their numbers make the image.
        array = np.asarray(item.tolist() if isinstance(item, np.ndarray) else item)
    except ValueError:  # ragged nested lists
        array = None
    if array is None or array.dtype == object or array.dtype.kind not in "biuf":
        raise ImageInputError(
            f"{name} is neither an array of pixel values nor PNG/TIFF bytes; send a uint8 "
            f"(H, W) or (H, W, C) array, or an image file's bytes"
        )
    if array.dtype.kind in "bi" and array.size and (array.min() < 0 or array.max() > 255):
        raise ImageInputError(f"{name} has pixel values outside 0-255; send 8-bit images")
    # Whole numbers from JSON arrive as int64; within 0-255 they are 8-bit pixels.
    return array.astype(np.uint8) if array.dtype.kind in "bi" else array


def encode_outputs(predictions: list[Prediction], single: bool) -> dict | list[dict]:
    """Plain arrays per image: ``probability`` (float32) and ``mask`` (uint8 0/1)."""
    out = [{"probability": p.probability, "mask": p.mask} for p in predictions]
    return out[0] if single else out


def served_code(dst: str | Path) -> Path:
    """Copy the modules the registered model runs into ``dst/mapnet_tune``; return that folder.

    Compiled files stay behind: the model carries source only.
    """
    package = Path(__file__).resolve().parent
    target = Path(dst) / package.name
    target.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SERVED_CODE:
        source = package / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=skip)
        else:
            shutil.copy2(source, target / name)
    return target
