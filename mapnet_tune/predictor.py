"""Image in, probability map out: the one home of a trained model's use.

A model folder holds what a trained model is: ``model.json`` (the MAP-Net configuration and
the model card) and ``weights.safetensors`` (the weights only, as plain tensors: loading the
folder runs no code from it). A :class:`Predictor` is rebuilt from it, as nnU-Net's
predictor is rebuilt from its results folder, and owns every step from a raw image to its
map: the card's preprocessing, its protocol (whole image padded to a valid size, or the
sliding window with the card's window and stride), the sigmoid, the card's threshold and the
way back to the image's own size. ``mapnet-tune predict``, ``evaluate``, the registered MLflow
model and the model served over HTTP all go through it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from safetensors.torch import load_file, save_file

from mapnet_tune import engine
from mapnet_tune.data import preprocess_images
from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet
from mapnet_tune.modelcard import ModelCard

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
#: The layout of ``model.json``; a new layout gets a new name.
FORMAT = "mapnet-tune/model-folder-1"
#: The smallest image side a model takes: MAP-Net downsamples by 16, so a smaller image is
#: all padding to it.
MIN_SIDE = 16
#: Intensity mappings that read an image's own values (CT in Hounsfield units, per-image
#: min-max); every other preprocessing was fitted on 8-bit images.
RAW_INTENSITIES = ("hu", "minmax")


@dataclass(frozen=True)
class Prediction:
    """One image's result, at the image's own height and width.

    Attributes:
        probability: float32 (H, W) foreground probabilities.
        mask: uint8 (H, W), 1 where the probability reaches the card's threshold.
    """

    probability: np.ndarray
    mask: np.ndarray


def save_folder(folder: str | Path, model: MAPNet, card: ModelCard) -> Path:
    """Write a model folder: the configuration and card as JSON, the weights as safetensors.

    Args:
        folder: Created if missing.
        model: A MAP-Net (its ``config`` rebuilds it).
        card: What the model is and how it is used.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "model_config": model.config, "card": card.to_dict()}
    (folder / MODEL_FILE).write_text(json.dumps(blob, indent=1, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def load_folder(folder: str | Path) -> tuple[MAPNet, ModelCard]:
    """The model (eval mode, CPU) and card of a model folder.

    Raises:
        UserError: Naming the folder when a file is missing or is not what it should be.
    """
    folder = Path(folder)
    try:
        blob = json.loads((folder / MODEL_FILE).read_text())
        if blob.get("format") != FORMAT:
            raise ValueError(f"{MODEL_FILE} is not {FORMAT}")
        model = MAPNet(**blob["model_config"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        card = ModelCard.from_dict(blob["card"])
    except Exception as exc:  # JSON, safetensors and torch each raise their own types
        raise UserError(
            f"model folder {folder} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); register the model again with "
            f"`mapnet-tune retrain-best --force`"
        ) from None
    return model.eval(), card


class Predictor:
    """A trained model ready for raw images of any size.

    Args:
        model: The MAP-Net, in eval mode.
        card: Its card: preprocessing, protocol, window, stride and threshold.
        device: torch device; default CUDA when present.
    """

    def __init__(self, model: MAPNet, card: ModelCard, device: str | None = None) -> None:
        self.card = card
        self.device = engine.pick_device(device)
        self.model = engine.prepare_model(model.eval(), self.device)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | None = None) -> Predictor:
        """Rebuild a predictor from a model folder (see :func:`save_folder`)."""
        model, card = load_folder(folder)
        return cls(model, card, device)

    def to(self, device: str | None) -> Predictor:
        """The same model on another device (itself when the device is the same)."""
        if engine.pick_device(device) == self.device:
            return self
        return Predictor(self.model, self.card, device)

    def predict(
        self,
        images: Sequence[np.ndarray],
        *,
        names: Sequence[str] | None = None,
        tta: bool = False,
        batch_size: int = 8,
    ) -> list[Prediction]:
        """Probability maps and masks for raw images, each at its own size.

        Images are checked first, so a bad one fails the call before any work. Images whose
        preprocessed inputs share a size go through the model together, ``batch_size`` at a
        time (sliding-window models batch their windows as the card says instead).

        Args:
            images: (H, W) or (H, W, C) arrays as read from image files: 8-bit, or any numeric
                depth when the card's preprocessing reads raw intensities (CT).
            names: How messages name each image (default ``image 1``, ``image 2``, ...).
            tta: Average over the identity and horizontal, vertical and both flips.
            batch_size: Whole images per forward pass.

        Raises:
            UserError: For an image that is empty, too small, of a depth the model does not
                take, or of an unknown layout, naming it.
        """
        names = list(names) if names is not None else [f"image {i + 1}" for i in range(len(images))]
        arrays = [self.check(image, name) for image, name in zip(images, names, strict=True)]
        inputs = [preprocess_images(self.card.preprocessing, [a])[0] for a in arrays]
        evaluation = self.card.evaluation
        if evaluation.protocol == "full-image":
            evaluation = dataclasses.replace(evaluation, batch_size=batch_size)
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, x in enumerate(inputs):
            by_size[x.shape].append(index)
        probs: list[np.ndarray] = [np.empty(0)] * len(inputs)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = engine.predict(
                    self.model,
                    np.stack([inputs[i] for i in chunk]),
                    evaluation,
                    device=self.device,
                    tta=tta,
                )
                for i, p in zip(chunk, batch.numpy(), strict=True):
                    probs[i] = p[0]
        return [
            self._at_size(prob, array.shape[:2]) for prob, array in zip(probs, arrays, strict=True)
        ]

    def check(self, image: np.ndarray, name: str) -> np.ndarray:
        """The image as the preprocessing takes it, or a one-line error naming it.

        Alpha is dropped from (H, W, 4) images; (H, W, 1) becomes (H, W).
        """
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] in (1, 4):
            image = image[..., 0] if image.shape[2] == 1 else image[..., :3]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise UserError(
                f"{name} has shape {image.shape}; pass an (H, W) grey or (H, W, 3) colour image"
            )
        if min(image.shape[:2]) < MIN_SIDE:
            raise UserError(
                f"{name} is {image.shape[0]}x{image.shape[1]} pixels; this model needs at least "
                f"{MIN_SIDE}x{MIN_SIDE}"
            )
        raw = self.card.preprocessing.get("intensity") in RAW_INTENSITIES
        if image.dtype != np.uint8 and not (raw and np.issubdtype(image.dtype, np.number)):
            raise UserError(
                f"{name} is {image.dtype}, but this {self.card.dataset} model takes 8-bit images; "
                f"convert it to 8 bits per channel (e.g. save it as an 8-bit PNG)"
            )
        return image

    def _at_size(self, prob: np.ndarray, size: tuple[int, ...]) -> Prediction:
        """Back to the image's own size (ISIC and lung resize), then thresholded."""
        height, width = size
        if prob.shape != (height, width):
            prob = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
        prob = prob.astype(np.float32)
        mask = (prob >= self.card.evaluation.threshold).astype(np.uint8)
        return Prediction(prob, mask)
