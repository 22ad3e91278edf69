"""Prediction overlays a person can read at a glance."""

from __future__ import annotations

import numpy as np


def overlay_panel(
    images: np.ndarray,
    masks: np.ndarray,
    probs: np.ndarray,
    fov: np.ndarray | None = None,
    threshold: float = 0.5,
) -> np.ndarray:
    """One RGB uint8 image: a row per sample with input, probability map and error overlay.

    The overlay paints true positives green, false positives red and false negatives blue
    on the grey input, and dims pixels outside the field of view.

    Args:
        images: (N, C, H, W) inputs in [0, 1].
        masks: (N, 1, H, W) ground truth in {0, 1}.
        probs: (N, 1, H, W) predicted probabilities.
        fov: Optional (N, 1, H, W) evaluated-pixel mask.
        threshold: Foreground threshold on ``probs``.

    Returns:
        (N*H, 3*W, 3) uint8.
    """
    rows = []
    for i in range(len(images)):
        img = images[i]
        rgb = np.repeat(img[:1], 3, 0) if img.shape[0] == 1 else img[:3]
        rgb = rgb.transpose(1, 2, 0).astype(np.float32)
        prob = np.repeat(probs[i, 0][:, :, None], 3, 2)
        pred, gt = probs[i, 0] >= threshold, masks[i, 0] > 0
        over = 0.6 * rgb.mean(axis=2, keepdims=True).repeat(3, 2)
        colours = {
            (True, True): (0.1, 0.9, 0.1),
            (True, False): (0.95, 0.1, 0.1),
            (False, True): (0.1, 0.3, 1.0),
        }
        for (p, g), colour in colours.items():
            over[(pred == p) & (gt == g)] = colour
        if fov is not None:
            over[fov[i, 0] == 0] *= 0.3
        rows.append(np.concatenate([rgb, prob, over], axis=1))
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).astype(np.uint8)
