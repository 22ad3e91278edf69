"""Split sizes and split construction shared by the dataset modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mapnet_tune.data.base import Split
from mapnet_tune.errors import UserError


def proportional_sizes(count: int, weights: Sequence[float], what: str) -> tuple[int, ...]:
    """Cut ``count`` items into consecutive blocks in proportion to ``weights``.

    Every block but the last gets ``round(count * w / sum(weights))``; the last gets the rest.
    A block left empty by rounding takes one item from the largest block, so every block is
    non-empty. With ISIC's weights (1815, 259, 520) and 2,594 images this gives exactly
    1815 / 259 / 520.

    Args:
        count: Number of items.
        weights: Relative size of each block.
        what: What is being split, for the error message.

    Raises:
        UserError: When there are fewer items than blocks.
    """
    if count < len(weights):
        raise UserError(
            f"{what} has {count} item(s), too few for {len(weights)} non-empty splits; "
            f"add at least {len(weights) - count} more"
        )
    total = float(sum(weights))
    sizes = [round(count * w / total) for w in weights[:-1]]
    sizes.append(count - sum(sizes))
    while min(sizes) < 1:
        sizes[int(np.argmax(sizes))] -= 1
        sizes[sizes.index(min(sizes))] += 1
    return tuple(sizes)


def require_nonempty(sizes: Mapping[str, int], what: str, fix: str) -> None:
    """Raise UserError naming the first empty split."""
    for name, size in sizes.items():
        if size < 1:
            listed = ", ".join(f"{k} {v}" for k, v in sizes.items())
            raise UserError(f"{what}: the {name} split would be empty ({listed}); {fix}")


def take(split: Split, index: slice | np.ndarray) -> Split:
    """The images ``index`` of a split without patches, with their masks, FOV and extras."""
    return Split(
        images=np.ascontiguousarray(split.images[index]),
        masks=np.ascontiguousarray(split.masks[index]),
        fov=None if split.fov is None else np.ascontiguousarray(split.fov[index]),
        names=tuple(np.asarray(split.names, dtype=object)[index]),
        extras={k: np.ascontiguousarray(v[index]) for k, v in split.extras.items()},
    )


def blocks(split: Split, names: Sequence[str], sizes: Sequence[int]) -> dict[str, Split]:
    """Consecutive blocks of a split: ``names[i]`` gets the next ``sizes[i]`` images."""
    bounds = np.cumsum([0, *sizes])
    return {
        name: take(split, slice(int(start), int(stop)))
        for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True)
    }
