"""Backbone blocks: stem, bottleneck, basic block, transitions and multi-path modules."""

from collections.abc import Sequence

from torch import Tensor, nn

from mapnet_tune.model.layers import (
    DEFAULT_BN,
    BatchNormSettings,
    PAConv,
    StemConv,
    upsample_nearest,
)


class Stem(nn.Module):
    """Down-sampling stem: three 3x3 conv-BN-ReLU units (the first with stride 2), 2x2 max-pool.

    Args:
        in_channels: Image channels.
        out_channels: Channels of all three convolutions.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self, in_channels: int, out_channels: int, bn: BatchNormSettings = DEFAULT_BN
    ) -> None:
        super().__init__()
        self.conv1 = StemConv(in_channels, out_channels, stride=2, bn=bn)
        self.conv2 = StemConv(out_channels, out_channels, bn=bn)
        self.conv3 = StemConv(out_channels, out_channels, bn=bn)
        self.pool = nn.MaxPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (B, C, H/2, W/2)
        x = self.conv2(x)  # (B, C, H/2, W/2)
        x = self.conv3(x)  # (B, C, H/2, W/2)
        return self.pool(x)  # (B, C, H/4, W/4)


class Bottleneck(nn.Module):
    """Pre-activation bottleneck: PA-conv 1x1, 3x3, 1x1 plus a shortcut, no activation after.

    Args:
        in_channels: Input channels.
        width: Channels of the inner 1x1 and 3x3 convolutions.
        out_channels: Output channels (``4 * width`` in MAP-Net).
        projection: Use a PA-conv 1x1 shortcut (the first block of stage 1) instead of identity.
        bn: BatchNorm hyper-parameters.

    Raises:
        ValueError: An identity shortcut was asked for while the channel counts differ.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        projection: bool,
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        if not projection and in_channels != out_channels:
            raise ValueError(
                f"an identity shortcut needs in_channels == out_channels, "
                f"got {in_channels} and {out_channels}"
            )
        self.conv1 = PAConv(in_channels, width, 1, bn=bn)
        self.conv2 = PAConv(width, width, 3, bn=bn)
        self.conv3 = PAConv(width, out_channels, 1, bn=bn)
        self.shortcut = PAConv(in_channels, out_channels, 1, bn=bn) if projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, H, W)
        return self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x)


class BasicBlock(nn.Module):
    """Pre-activation basic block: two PA-conv 3x3 at constant width plus identity.

    Args:
        channels: Input and output channels.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(self, channels: int, bn: BatchNormSettings = DEFAULT_BN) -> None:
        super().__init__()
        self.conv1 = PAConv(channels, channels, 3, bn=bn)
        self.conv2 = PAConv(channels, channels, 3, bn=bn)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, C, H, W)
        return self.conv2(self.conv1(x)) + x


class Transition(nn.Module):
    """Adds one path: every existing path gets a PA-conv 3x3, the new one a stride-2 PA-conv 3x3.

    The new, twice coarser path is computed from the last (coarsest) input path.

    Args:
        in_channels: Channels of the existing paths, finest first.
        out_channels: Channels of the output paths; one more entry than ``in_channels``.
        bn: BatchNorm hyper-parameters.

    Raises:
        ValueError: ``out_channels`` is not one entry longer than ``in_channels``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        if len(out_channels) != len(in_channels) + 1:
            raise ValueError(
                f"a transition adds exactly one path: got {len(in_channels)} input and "
                f"{len(out_channels)} output channel counts"
            )
        self.paths = nn.ModuleList(
            PAConv(c_in, c_out, 3, bn=bn)
            for c_in, c_out in zip(in_channels, out_channels, strict=False)
        )
        self.new_path = PAConv(in_channels[-1], out_channels[-1], 3, stride=2, bn=bn)

    def forward(self, paths: list[Tensor]) -> list[Tensor]:
        # paths[i]: (B, Cin_i, H_i, W_i) -> (B, Cout_i, H_i, W_i), plus (B, Cout_n, H/2, W/2)
        # made from the coarsest path.
        kept = [conv(x) for conv, x in zip(self.paths, paths, strict=True)]
        return [*kept, self.new_path(paths[-1])]


class UpsampleFuse(nn.Module):
    """Coarse-to-fine exchange term: PA-conv 1x1, then nearest up-sampling.

    Args:
        in_channels: Channels of the coarser source path.
        out_channels: Channels of the target path.
        factor: Integer up-sampling factor, ``2 ** (source - target)``.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        factor: int,
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        self.conv = PAConv(in_channels, out_channels, 1, bn=bn)
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, Cin, H, W) -> (B, Cout, H * factor, W * factor)
        return upsample_nearest(self.conv(x), self.factor)


class DownsampleFuse(nn.Sequential):
    """Fine-to-coarse exchange term: ``steps`` x (PA-conv 1x1, 2x2/2 max-pool).

    Every step keeps the source width except the last, which maps to the target width.

    Args:
        in_channels: Channels of the finer source path.
        out_channels: Channels of the target path.
        steps: Number of halvings, ``target - source``.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        steps: int,
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        layers: list[nn.Module] = []
        for step in range(steps):
            step_out = out_channels if step == steps - 1 else in_channels
            layers += [PAConv(in_channels, step_out, 1, bn=bn), nn.MaxPool2d(2, 2)]
        super().__init__(*layers)


class SumFusion(nn.Module):
    """Multi-scale exchange: output path i is x_i plus one resampled term from every other path.

    Args:
        channels: Channels of the paths, finest first.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(self, channels: Sequence[int], bn: BatchNormSettings = DEFAULT_BN) -> None:
        super().__init__()
        self.terms = nn.ModuleDict()
        self.sources: list[list[tuple[int, str]]] = []
        for target, c_target in enumerate(channels):
            sources = []
            for source, c_source in enumerate(channels):
                if source == target:
                    continue
                name = f"{source}_to_{target}"
                if source > target:
                    term = UpsampleFuse(c_source, c_target, 2 ** (source - target), bn=bn)
                else:
                    term = DownsampleFuse(c_source, c_target, target - source, bn=bn)
                self.terms[name] = term
                sources.append((source, name))
            self.sources.append(sources)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        # xs[i]: (B, C_i, H / 2**i, W / 2**i) -> same shapes; no ReLU after the sums.
        return [
            sum((self.terms[name](xs[source]) for source, name in sources), xs[target])
            for target, sources in enumerate(self.sources)
        ]


class FinalFusion(nn.Module):
    """Last-module exchange: every coarser path is brought to the finest grid, nothing is added.

    Each coarser path j goes through a PA-conv 1x1 that keeps its own width, then nearest
    up-sampling by ``2 ** j``. For three paths the output is ``[A, B, C]`` with A the 1/8 path,
    B the 1/16 path and C the untouched 1/4 path.

    Args:
        channels: Channels of the paths, finest first.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(self, channels: Sequence[int], bn: BatchNormSettings = DEFAULT_BN) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            UpsampleFuse(c, c, 2**j, bn=bn) for j, c in enumerate(channels) if j > 0
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        # xs[j]: (B, C_j, H / 2**j, W / 2**j) -> [(B, C_1, H, W), ..., (B, C_n-1, H, W),
        # (B, C_0, H, W)]
        ups = [up(x) for up, x in zip(self.ups, xs[1:], strict=True)]
        return [*ups, xs[0]]


class MultiPathModule(nn.Module):
    """Parallel paths of basic blocks followed by an exchange between the paths.

    Args:
        channels: Channels of the paths, finest first; path i has stride ``2 ** i`` relative
            to path 0.
        num_blocks: Basic blocks per path.
        final: Use :class:`FinalFusion` (last module of the last stage) instead of
            :class:`SumFusion`.
        bn: BatchNorm hyper-parameters.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_blocks: int = 4,
        final: bool = False,
        bn: BatchNormSettings = DEFAULT_BN,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c, bn=bn) for _ in range(num_blocks))) for c in channels
        )
        self.fusion = FinalFusion(channels, bn=bn) if final else SumFusion(channels, bn=bn)

    def forward(self, paths: list[Tensor]) -> list[Tensor]:
        # paths[i]: (B, C_i, H / 2**i, W / 2**i); output as described by the fusion.
        xs = [branch(x) for branch, x in zip(self.branches, paths, strict=True)]
        return self.fusion(xs)
