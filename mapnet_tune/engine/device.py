"""Where and how the model runs: device choice, autocast, memory format, padding."""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (same accuracy, several times the speed); nothing elsewhere.

    ``enabled=False`` (``TrainSettings.amp``) gives the fp32 reference on CUDA too.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model to ``device``; channels_last on CUDA, where cuDNN is faster with it."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        # Trials train on a few fixed input shapes: cuDNN's autotuner pays back at once.
        torch.backends.cudnn.benchmark = True
    return model


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy on the CPU, for logging or registering without touching the training copy."""
    return copy.deepcopy(model).to("cpu").float().to(memory_format=torch.contiguous_format)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits for any input size: straight through when the size is valid, else pad-and-crop."""
    h, w = x.shape[-2:]
    if h % 16 == 0 and w % 16 == 0 and min(h, w) >= 32:
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x)
    return model.forward_padded(x)


def padded_side(height: int, width: int) -> int:
    """The square side a whole image is padded to: a multiple of 16, at least 32.

    Square, so that 90-degree rotations keep a batch's shape; used by training on whole
    images and by full-image prediction alike, so the model sees the same borders in both.
    """
    return max(32, -(-max(height, width) // 16) * 16)


def pad_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """Zero-pad (..., H, W) at the bottom and right to (..., side, side)."""
    return F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))


def gather_patches(images: torch.Tensor, coords: torch.Tensor, size: int) -> torch.Tensor:
    """Cut (image, top, left) patches of ``size`` from ``images`` (N, C, H, W) in one gather."""
    offsets = torch.arange(size, device=images.device)
    rows = (coords[:, 1:2] + offsets)[:, :, None]  # (B, size, 1)
    cols = (coords[:, 2:3] + offsets)[:, None, :]  # (B, 1, size)
    idx = coords[:, 0][:, None, None]
    return images.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
