"""MAP-Net head: channel attention, spatial pooling, fusion and the bilinear decoder."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mapnet_tune.model.layers import (
    DEFAULT_BN,
    BatchNormSettings,
    PAConv,
    check_head_interpolation,
    resize_bilinear,
)

POOL_SIZES = (2, 3, 5, 6)
"""Windows (and strides) of the spatial pooling branches."""


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation with reduction ratio 1: GAP, dense + ReLU, dense + sigmoid, scale.

    Args:
        channels: Input channels; both dense layers have this many units.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels)
        # In place is safe: the dense layer's backward needs its input, not its output.
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, C, H, W)
        weights = x.mean(dim=(2, 3))  # (B, C)
        weights = torch.sigmoid(self.fc2(self.relu(self.fc1(weights))))  # (B, C)
        return x * weights[:, :, None, None]


class SpatialPooling(nn.Module):
    """Max-pools at several VALID windows, resized back and stacked with the input.

    Has no parameters. The output is ``[pool_k1, ..., pool_kn, x]`` on channels.

    Args:
        pool_sizes: Window (and stride) of each branch.
        interpolation: Head interpolation, see :data:`HEAD_INTERPOLATIONS`.
    """

    def __init__(
        self, pool_sizes: Sequence[int] = POOL_SIZES, interpolation: str = "legacy"
    ) -> None:
        super().__init__()
        check_head_interpolation(interpolation)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, k) for k in pool_sizes)
        self.interpolation = interpolation

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, (len(pool_sizes) + 1) * C, H, W); branch k is pooled to
        # (H // k, W // k) before the resize.
        size = (x.shape[-2], x.shape[-1])
        pooled = [resize_bilinear(pool(x), size, self.interpolation) for pool in self.pools]
        return torch.cat([*pooled, x], dim=1)


class UpConv(nn.Module):
    """Bilinear x2 resize followed by a PA-conv 3x3.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        interpolation: Head interpolation, see :data:`HEAD_INTERPOLATIONS`.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        interpolation: str = "legacy",
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        check_head_interpolation(interpolation)
        self.interpolation = interpolation
        self.conv = PAConv(in_channels, out_channels, 3, bn=bn)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, 2H, 2W)
        size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(resize_bilinear(x, size, self.interpolation))


class MAPNetHead(nn.Module):
    """Attention-based squeeze, spatial pooling, fusion and the up-sampling decoder.

    Takes the final-mode outputs ``[A, B, C]`` of the last multi-path module, all at 1/4 of the
    input resolution, and returns logits at full resolution. Attention sees ``[A, B, C]``;
    spatial pooling sees only ``[A, B]``, as in the official code.

    Args:
        a_channels: Channels of A (the up-sampled 1/8 path).
        b_channels: Channels of B (the up-sampled 1/16 path).
        c_channels: Channels of C (the native 1/4 path).
        widths: Channels after the fusion, the first and the second up-sampling.
        out_channels: Logit channels.
        interpolation: Head interpolation, see :data:`HEAD_INTERPOLATIONS`.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        a_channels: int,
        b_channels: int,
        c_channels: int,
        widths: tuple[int, int, int],
        out_channels: int,
        interpolation: str = "legacy",
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        attention_channels = a_channels + b_channels + c_channels
        pooled_channels = (len(POOL_SIZES) + 1) * (a_channels + b_channels)
        fuse_width, up1_width, up2_width = widths
        self.attention = ChannelAttention(attention_channels)
        self.pooling = SpatialPooling(POOL_SIZES, interpolation)
        self.fuse = PAConv(pooled_channels + attention_channels, fuse_width, 1, bn=bn)
        self.up1 = UpConv(fuse_width, up1_width, interpolation, bn=bn)
        self.up2 = UpConv(up1_width, up2_width, interpolation, bn=bn)
        self.classifier = PAConv(up2_width, out_channels, 1, bn=bn)

    def forward(self, features: list[Tensor]) -> Tensor:
        # features: A (B, Ca, H/4, W/4), B (B, Cb, H/4, W/4), C (B, Cc, H/4, W/4)
        a, b, c = features
        s = self.attention(torch.cat([a, b, c], dim=1))  # (B, Ca+Cb+Cc, H/4, W/4)
        q = self.pooling(torch.cat([a, b], dim=1))  # (B, 5 (Ca+Cb), H/4, W/4)
        x = self.fuse(torch.cat([q, s], dim=1))  # (B, 128w, H/4, W/4)
        x = self.up1(x)  # (B, 64w, H/2, W/2)
        x = self.up2(x)  # (B, 32w, H, W)
        return self.classifier(x)  # (B, out_channels, H, W)
