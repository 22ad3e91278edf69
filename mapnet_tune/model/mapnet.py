"""The MAP-Net assembly and its input-size rules."""

import torch.nn.functional as F
from torch import Tensor, nn

from mapnet_tune.model.blocks import Bottleneck, MultiPathModule, Stem, Transition
from mapnet_tune.model.head import MAPNetHead
from mapnet_tune.model.layers import BatchNormSettings, check_head_interpolation, init_conv_

SIZE_MULTIPLE = 16
"""H and W must be multiples of this so that the 1/4, 1/8 and 1/16 grids nest exactly."""

MIN_SIZE = 32
"""Smallest H and W: the 6x6 pooling of the head needs a 1/4 map of at least 6 pixels."""


def padded_size(size: int) -> int:
    """The smallest supported length that is at least ``size``."""
    return max(MIN_SIZE, -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE)


def check_input_size(height: int, width: int) -> None:
    """Raise if MAP-Net cannot run on a ``height`` x ``width`` input.

    Only compares Python ints, so it is free inside compiled or CUDA-graph-captured code.

    Args:
        height: Input height in pixels.
        width: Input width in pixels.

    Raises:
        ValueError: A side is not a multiple of 16 or is smaller than 32. The message names the
            nearest larger supported size.
    """
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(
            f"input size {height}x{width} is not supported: H and W must be multiples of "
            f"{SIZE_MULTIPLE} and at least {MIN_SIZE} (e.g. 64x64, 592x576); pad it to "
            f"{padded_size(height)}x{padded_size(width)} or use MAPNet.forward_padded for "
            f"other sizes"
        )


def scale_channels(channels: int, width: float) -> int:
    """Channel count ``channels`` multiplied by the width factor, rounded, at least 1."""
    return max(1, round(channels * width))


def _init_weights(module: nn.Module) -> None:
    # TF1 defaults: fan-in truncated normal for kernels, Glorot uniform and zero bias for dense
    # layers; BatchNorm keeps PyTorch's defaults, which match TF's.
    if isinstance(module, nn.Conv2d):
        init_conv_(module)
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def _pad_bottom_right(x: Tensor, pad_h: int, pad_w: int) -> Tensor:
    # Reflection needs the pad to be shorter than the side; a tiny side is replicated instead.
    if pad_w:
        mode = "reflect" if pad_w < x.shape[-1] else "replicate"
        x = F.pad(x, (0, pad_w, 0, 0), mode=mode)
    if pad_h:
        mode = "reflect" if pad_h < x.shape[-2] else "replicate"
        x = F.pad(x, (0, 0, 0, pad_h), mode=mode)
    return x


class MAPNet(nn.Module):
    """MAP-Net (Zhu et al., arXiv:1910.12060) as built by the official TensorFlow code.

    A pre-activation stem and bottleneck stage, then multi-path stages over 1/4, 1/8 and 1/16
    paths, then channel attention, spatial pooling and a bilinear decoder. Returns logits at the
    input resolution; there is no sigmoid.

    Args:
        in_channels: Image channels.
        out_channels: Logit channels.
        width: Multiplies every channel count (64/128/256 paths, stage-1 bottleneck, head
            128/64/32); 1.0 is the published model.
        head_interpolation: ``"legacy"`` for TF1 ``resize_bilinear`` coordinates as in the
            official model, or ``"pytorch"`` for ``F.interpolate`` bilinear with half-pixel
            centres.
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum in PyTorch's convention (1 - TF momentum).

    Raises:
        ValueError: A channel count is below 1, ``width`` is not positive, or
            ``head_interpolation`` is unknown.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: float = 1.0,
        head_interpolation: str = "legacy",
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be at least 1, "
                f"got {in_channels} and {out_channels}"
            )
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        check_head_interpolation(head_interpolation)
        self._config: dict[str, int | float | str] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "width": width,
            "head_interpolation": head_interpolation,
            "bn_eps": bn_eps,
            "bn_momentum": bn_momentum,
        }
        bn = BatchNormSettings(eps=bn_eps, momentum=bn_momentum)
        c64, c128, c256 = (scale_channels(c, width) for c in (64, 128, 256))
        paths = (c64, c128, c256)

        self.stem = Stem(in_channels, c64, bn=bn)
        self.stage1 = nn.Sequential(
            Bottleneck(c64, c64, c256, projection=True, bn=bn),
            *(Bottleneck(c256, c64, c256, projection=False, bn=bn) for _ in range(3)),
        )
        self.transition1 = Transition([c256], paths[:2], bn=bn)
        self.stage2 = nn.Sequential(*(MultiPathModule(paths[:2], bn=bn) for _ in range(2)))
        self.transition2 = Transition(paths[:2], paths, bn=bn)
        self.stage3 = nn.Sequential(
            MultiPathModule(paths, bn=bn),
            MultiPathModule(paths, bn=bn),
            MultiPathModule(paths, final=True, bn=bn),
        )
        self.head = MAPNetHead(
            a_channels=c128,
            b_channels=c256,
            c_channels=c64,
            widths=(c128, c64, scale_channels(32, width)),
            out_channels=out_channels,
            interpolation=head_interpolation,
            bn=bn,
        )
        self.apply(_init_weights)

    @property
    def config(self) -> dict[str, int | float | str]:
        """The constructor arguments, enough to rebuild the model: ``MAPNet(**model.config)``."""
        return dict(self._config)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Args:
            x: ``(B, in_channels, H, W)`` images; H and W multiples of 16 and at least 32.

        Returns:
            ``(B, out_channels, H, W)`` logits.

        Raises:
            ValueError: The input size is not supported (see :func:`check_input_size`).
        """
        check_input_size(x.shape[-2], x.shape[-1])
        x = self.stem(x)  # (B, 64w, H/4, W/4)
        x = self.stage1(x)  # (B, 256w, H/4, W/4)
        paths = self.transition1([x])  # P0 (B, 64w, H/4, W/4), P1 (B, 128w, H/8, W/8)
        paths = self.stage2(paths)  # same shapes
        paths = self.transition2(paths)  # P0, P1 and P2 (B, 256w, H/16, W/16)
        features = self.stage3(paths)  # A (B, 128w), B (B, 256w), C (B, 64w), all H/4 x W/4
        return self.head(features)  # (B, out_channels, H, W)

    def forward_padded(self, x: Tensor) -> Tensor:
        """Compute logits for any input size by padding and cropping.

        Pads the bottom and right up to the next supported size (multiple of 16, at least 32),
        by reflection where the side is long enough and by replication otherwise, runs the
        network and crops the logits back.

        Args:
            x: ``(B, in_channels, H, W)`` images with H, W >= 1.

        Returns:
            ``(B, out_channels, H, W)`` logits.

        Raises:
            ValueError: H or W is below 1.
        """
        height, width = x.shape[-2], x.shape[-1]
        if height < 1 or width < 1:
            raise ValueError(f"input size {height}x{width} is empty; H and W must be at least 1")
        x = _pad_bottom_right(x, padded_size(height) - height, padded_size(width) - width)
        return self(x)[..., :height, :width]
