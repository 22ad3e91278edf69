"""Scoring and using a model: full-image and sliding-window prediction, pooled metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mapnet_tune.data import Split
from mapnet_tune.engine.device import (
    autocast,
    forward,
    gather_patches,
    pad_square,
    padded_side,
    pick_device,
)
from mapnet_tune.metrics import (
    Confusion,
    MetricAccumulator,
    legacy_lung_confusion,
    legacy_lung_metrics,
)

#: Protocols :func:`evaluate` knows: the split's patch coordinates (DRIVE's validation patches),
#: whole images, or the published sliding window.
PROTOCOLS = ("patches", "full-image", "sliding-window")


@dataclass(frozen=True)
class Evaluation:
    """How a model is scored and used: the one place that holds the window and the stride.

    Attributes:
        protocol: One of :data:`PROTOCOLS`.
        window: Sliding-window side (the training patch side of the model).
        stride: Sliding-window step; the published DRIVE numbers use 5.
        batch_size: Images (full-image) or windows/patches per forward pass.
        threshold: Probability at and above which a pixel is foreground.
    """

    protocol: str = "full-image"
    window: int = 64
    stride: int = 16
    batch_size: int = 16
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"unknown protocol '{self.protocol}'; use one of {', '.join(PROTOCOLS)}"
            )

    def describe(self) -> str:
        """``sliding-window 256 px, stride 64`` or ``full-image``: for tables and cards."""
        if self.protocol == "sliding-window":
            return f"sliding-window {self.window} px, stride {self.stride}"
        return self.protocol


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    evaluation: Evaluation = Evaluation(),
    *,
    device: torch.device | None = None,
    tta: bool = False,
    amp: bool = True,
) -> torch.Tensor:
    """Foreground probabilities for whole images of any size.

    Args:
        model: Returns logits.
        images: (N, C, H, W) float in [0, 1].
        evaluation: ``full-image`` (zero-padded to the square :func:`padded_side`, as whole
            images are in training, and cropped back) or ``sliding-window`` (the published
            protocol: windows every ``stride`` pixels, zero padding bottom/right,
            probabilities averaged over overlaps); ``batch_size`` images or windows per pass.
        device: Default :func:`pick_device`.
        tta: Average over the identity and horizontal, vertical and both flips.
        amp: bf16 autocast on CUDA; False runs in fp32.

    Returns:
        (N, 1, H, W) float32 probabilities on the CPU.
    """
    if evaluation.protocol == "patches":
        raise ValueError(
            "protocol 'patches' scores a split's patches; predict whole images "
            "with full-image or sliding-window"
        )
    device = device or pick_device()
    model.eval()
    x_all = torch.as_tensor(images)
    step = 1 if evaluation.protocol == "sliding-window" else evaluation.batch_size
    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    out = []
    for i in range(0, len(x_all), step):
        x = x_all[i : i + step].to(device).float()
        probs = sum(_flipped(model, x, dims, evaluation, device, amp) for dims in flips) / len(
            flips
        )
        out.append(probs.float().cpu())
    return torch.cat(out)


def _flipped(
    model: nn.Module,
    x: torch.Tensor,
    dims: tuple[int, ...],
    evaluation: Evaluation,
    device: torch.device,
    amp: bool,
) -> torch.Tensor:
    x = torch.flip(x, dims) if dims else x
    if evaluation.protocol == "full-image":
        height, width = x.shape[-2:]
        with autocast(device, amp):
            logits = forward(model, pad_square(x, padded_side(height, width)))
        probs = torch.sigmoid(logits.float())[..., :height, :width]
    else:
        probs = _sliding_window(model, x, evaluation, device, amp)
    return torch.flip(probs, dims) if dims else probs


def _sliding_window(
    model: nn.Module, x: torch.Tensor, evaluation: Evaluation, device: torch.device, amp: bool
) -> torch.Tensor:
    """Overlap-averaged window probabilities for one image (1, C, H, W).

    Windows are cut, predicted and added into the running sums ``batch_size`` at a time, so
    memory holds one batch of windows and never all of them: at stride 5, a 584x565 RGB image
    has 4,221 windows of 256 px, 3.3 GB as float32 (benchmarks/sliding_window_memory.py).
    """
    window, stride, batch_size = evaluation.window, evaluation.stride, evaluation.batch_size
    _, _, h, w = x.shape
    # Pad bottom/right with zeros until (size - window) is a multiple of the stride, as the
    # published evaluation does (DRIVE: 584x565 -> 584x569 at stride 5).
    ph = max(window, h + (-(h - window)) % stride)
    pw = max(window, w + (-(w - window)) % stride)
    padded = F.pad(x, (0, pw - w, 0, ph - h))
    corners = [
        (top, left)
        for top in range(0, ph - window + 1, stride)
        for left in range(0, pw - window + 1, stride)
    ]
    summed = torch.zeros(1, 1, ph, pw, device=device)
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        windows = torch.cat([padded[..., t : t + window, s : s + window] for t, s in chunk])
        with autocast(device, amp):
            probs = torch.sigmoid(forward(model, windows).float())
        for (top, left), prob in zip(chunk, probs, strict=True):
            summed[0, :, top : top + window, left : left + window] += prob
    # How many windows cover a pixel depends on the geometry alone: rows times columns.
    counts = torch.outer(_coverage(ph, window, stride), _coverage(pw, window, stride))
    return (summed / counts.to(device))[:, :, :h, :w]


def _coverage(size: int, window: int, stride: int) -> torch.Tensor:
    """How many windows every ``stride`` pixels cover each position along one axis."""
    cover = torch.zeros(size)
    for start in range(0, size - window + 1, stride):
        cover[start : start + window] += 1
    return cover


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    evaluation: Evaluation,
    prefix: str = "val",
    *,
    device: torch.device | None = None,
    legacy: bool = False,
    accumulator: MetricAccumulator | None = None,
    amp: bool = True,
) -> dict[str, float]:
    """Score a split with pooled counts over its evaluated pixels (its FOV when it has one).

    A whole-image split whose extras hold ``lung`` and ``body_fov`` (lung target
    ``bcdu-outside``) is also scored the published way, estimated lung = FOV and not the
    prediction against the lung mask, under ``prefix/legacy_lung_*`` keys (see
    :func:`~mapnet_tune.metrics.legacy_lung_metrics`); that evaluation leaks ground truth
    through the FOV, so the target's own metrics stay the honest ones.

    Args:
        evaluation: The protocol (``patches`` scores the split's patch coordinates, e.g.
            DRIVE validation patches), window, stride, batch size and threshold.
        prefix: Metric key prefix (``val`` or ``test``).
        legacy: Also report the published "JS" (pixel accuracy) and thresholded AUC.
        accumulator: Collects the counts and histograms; pass a fresh one (with the
            evaluation's threshold) to read more than the metrics afterwards (its ROC curve).
        amp: bf16 autocast on CUDA; False scores in fp32.

    Returns:
        Metrics keyed ``prefix/name``.
    """
    device = device or pick_device()
    acc = accumulator if accumulator is not None else MetricAccumulator(evaluation.threshold)
    lung_counts: list[Confusion] = []  # legacy lung evaluation, per batch
    batch_size = evaluation.batch_size
    if evaluation.protocol == "patches":
        if split.patches is None:
            raise ValueError(
                "protocol 'patches' needs a split with patch coordinates; "
                "use full-image or sliding-window"
            )
        model.eval()
        images = torch.from_numpy(split.images).to(device)
        masks = torch.from_numpy(split.masks).to(device)
        fov = torch.from_numpy(split.fov).to(device) if split.fov is not None else None
        coords = torch.from_numpy(split.patches.astype(np.int64)).to(device)
        for i in range(0, len(coords), batch_size):
            c = coords[i : i + batch_size]
            x = gather_patches(images, c, split.patch_size).float()
            with autocast(device, amp):
                probs = torch.sigmoid(forward(model, x).float())
            valid = gather_patches(fov, c, split.patch_size) > 0 if fov is not None else None
            acc.update(probs, gather_patches(masks, c, split.patch_size) > 0, valid)
    else:
        # Full images go through in batches; sliding-window batches its windows instead.
        step = batch_size if evaluation.protocol == "full-image" else 1
        lung, body_fov = split.extras.get("lung"), split.extras.get("body_fov")
        for i in range(0, len(split.images), step):
            probs = predict(model, split.images[i : i + step], evaluation, device=device, amp=amp)
            valid = torch.from_numpy(split.fov[i : i + step]) > 0 if split.fov is not None else None
            acc.update(probs, torch.from_numpy(split.masks[i : i + step]) > 0, valid)
            if lung is not None and body_fov is not None:
                lung_counts.append(
                    legacy_lung_confusion(
                        probs, lung[i : i + step], body_fov[i : i + step], acc.threshold
                    )
                )
    metrics = acc.compute(prefix, legacy=legacy)
    if lung_counts:
        pooled = Confusion(*(sum(counts) for counts in zip(*lung_counts, strict=True)))
        metrics.update(legacy_lung_metrics(pooled, prefix))
    return metrics
