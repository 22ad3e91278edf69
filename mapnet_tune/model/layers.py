"""Convolution units, TF-compatible padding and the two kinds of up-sampling used by MAP-Net."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_INTERPOLATIONS = ("legacy", "pytorch")
"""Valid values of ``head_interpolation``: TF1 legacy bilinear or PyTorch half-pixel bilinear."""

# Standard deviation of a unit normal truncated at +-2. TF1's truncated-normal initialiser divides
# by it so that the truncated draw keeps the requested variance.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


@dataclass(frozen=True)
class BatchNormSettings:
    """BatchNorm hyper-parameters shared by every normalisation layer of the network.

    Attributes:
        eps: Added to the variance; TF's ``epsilon``.
        momentum: PyTorch momentum, i.e. 1 - TF momentum.
    """

    eps: float = 1e-3
    momentum: float = 0.01

    def make(self, channels: int) -> nn.BatchNorm2d:
        """Return a fresh ``BatchNorm2d`` over ``channels`` with these settings."""
        return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)


DEFAULT_BN = BatchNormSettings()


def check_head_interpolation(name: str) -> None:
    """Raise if ``name`` is not a supported head interpolation.

    Raises:
        ValueError: ``name`` is not one of :data:`HEAD_INTERPOLATIONS`.
    """
    if name not in HEAD_INTERPOLATIONS:
        valid = ", ".join(repr(v) for v in HEAD_INTERPOLATIONS)
        raise ValueError(f"unknown head_interpolation {name!r}; valid values are {valid}")


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Padding that TensorFlow's "SAME" mode adds along one axis.

    Args:
        size: Input length along the axis.
        kernel_size: Kernel length along the axis.
        stride: Stride along the axis.

    Returns:
        ``(before, after)``; the larger half goes after, so a stride-2 3x3 convolution over an
        even length pads 0 before and 1 after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with TensorFlow "SAME" padding.

    Stride-1 odd kernels pad symmetrically inside the convolution. Any other case (the stride-2
    convolutions) pads explicitly and asymmetrically first, because PyTorch's symmetric padding
    would sample a grid shifted by one pixel.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Square stride.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
    ) -> None:
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if symmetric else 0,
            bias=False,
        )
        self.pad_explicitly = not symmetric

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, ceil(H / s), ceil(W / s))
        if self.pad_explicitly:
            top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def init_conv_(conv: nn.Conv2d) -> None:
    """Initialise a kernel like TF1's ``variance_scaling_initializer()`` (fan-in, truncated)."""
    kernel_h, kernel_w = conv.kernel_size
    fan_in = conv.in_channels // conv.groups * kernel_h * kernel_w
    std = math.sqrt(1.0 / fan_in) / _TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(conv.weight, 0.0, std, -2.0 * std, 2.0 * std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class PAConv(nn.Module):
    """Pre-activation unit: BatchNorm, ReLU, then a bias-free convolution with "SAME" padding.

    Args:
        in_channels: Input channels (also the BatchNorm width).
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Convolution stride.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        self.bn = bn.make(in_channels)
        # In place is safe: BatchNorm's backward needs its input, not its output.
        self.relu = nn.ReLU(inplace=True)
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, ceil(H / s), ceil(W / s))
        return self.conv(self.relu(self.bn(x)))


class StemConv(nn.Module):
    """Post-activation stem unit: 3x3 bias-free convolution, BatchNorm, ReLU.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Convolution stride; stride 2 uses TF "SAME" asymmetric padding.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, 3, stride)
        self.bn = bn.make(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, ceil(H / s), ceil(W / s))
        return self.relu(self.bn(self.conv(x)))


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour up-sampling by an integer factor, ``out[i] = in[floor(i / factor)]``.

    This is what Keras ``UpSampling2D`` does inside the multi-path fusion.
    """
    # x: (B, C, H, W) -> (B, C, H * factor, W * factor)
    return F.interpolate(x, scale_factor=factor, mode="nearest")


# (n_in, n_out, device, dtype) -> (i0, i1, weight) for the legacy resize along one axis.
_LEGACY_AXIS_CACHE: dict[tuple[int, int, torch.device, torch.dtype], tuple[Tensor, ...]] = {}


def _legacy_axis(
    n_in: int, n_out: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """Source indices and blend weights of TF1 ``resize_bilinear`` along one axis."""
    # float32 coordinates, as TF computes them: s = d * (n_in / n_out).
    src = torch.arange(n_out, device=device, dtype=torch.float32) * (n_in / n_out)
    i0 = src.floor()
    weight = (src - i0).to(dtype)
    i0 = i0.long()
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0, i1, weight


def _legacy_axis_cached(
    n_in: int, n_out: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, ...]:
    # A compiled graph folds the index arithmetic into constants itself, and must not write to
    # a Python dict while tracing.
    if torch.compiler.is_compiling():
        return _legacy_axis(n_in, n_out, device, dtype)
    key = (n_in, n_out, device, dtype)
    if key not in _LEGACY_AXIS_CACHE:
        _LEGACY_AXIS_CACHE[key] = _legacy_axis(n_in, n_out, device, dtype)
    return _LEGACY_AXIS_CACHE[key]


def _legacy_resize_dim(x: Tensor, dim: int, n_out: int) -> Tensor:
    n_in = x.shape[dim]
    if n_in == n_out:
        return x
    i0, i1, weight = _legacy_axis_cached(n_in, n_out, x.device, x.dtype)
    shape = [1] * x.dim()
    shape[dim] = n_out
    return torch.lerp(x.index_select(dim, i0), x.index_select(dim, i1), weight.view(shape))


def legacy_resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 ``resize_bilinear`` with ``align_corners=False`` and legacy (not half-pixel) centres.

    Output index d reads source coordinate ``s = d * n_in / n_out`` and mixes rows
    ``floor(s)`` and ``min(floor(s) + 1, n_in - 1)``, separably in H and W. For an exact x2 this
    gives ``out[2k] = in[k]``, ``out[2k+1] = (in[k] + in[k+1]) / 2`` and repeats the last row.

    Args:
        x: ``(B, C, H, W)`` tensor, NCHW or channels_last; its dtype and layout are kept.
        size: Output ``(height, width)``; any positive size, not only integer factors.

    Returns:
        The resized ``(B, C, height, width)`` tensor.
    """
    # index_select writes a contiguous result, so a channels_last input is resized as the
    # NHWC-contiguous view it really is and permuted back, keeping its layout.
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    h_dim, w_dim = (1, 2) if channels_last else (2, 3)
    y = x.permute(0, 2, 3, 1) if channels_last else x
    y = _legacy_resize_dim(y, h_dim, size[0])
    y = _legacy_resize_dim(y, w_dim, size[1])
    return y.permute(0, 3, 1, 2) if channels_last else y


def resize_bilinear(x: Tensor, size: tuple[int, int], interpolation: str) -> Tensor:
    """Bilinear resize used by the head.

    Args:
        x: ``(B, C, H, W)`` tensor.
        size: Output ``(height, width)``.
        interpolation: ``"legacy"`` for TF1 coordinates (the official model) or ``"pytorch"``
            for ``F.interpolate`` with half-pixel centres.

    Returns:
        The resized ``(B, C, height, width)`` tensor.
    """
    if interpolation == "legacy":
        return legacy_resize_bilinear(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
