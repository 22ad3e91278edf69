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
    """The images ``index`` of a split with their masks, FOV, extras and patches.

    Patches of the chosen images are kept, re-indexed to the new image order.
    """
    patches = None
    if split.patches is not None:
        chosen = np.arange(len(split.images))[index]
        new_index = np.full(len(split.images), -1)
        new_index[chosen] = np.arange(len(chosen))
        patches = split.patches[new_index[split.patches[:, 0]] >= 0].copy()
        patches[:, 0] = new_index[patches[:, 0]]
        # A stable sort by new image keeps the "ordered by image" layout of patch lists.
        patches = patches[np.argsort(patches[:, 0], kind="stable")]
    return Split(
        images=np.ascontiguousarray(split.images[index]),
        masks=np.ascontiguousarray(split.masks[index]),
        fov=None if split.fov is None else np.ascontiguousarray(split.fov[index]),
        names=tuple(np.asarray(split.names, dtype=object)[index]),
        patches=patches,
        patch_size=split.patch_size if patches is not None else None,
        extras={k: np.ascontiguousarray(v[index]) for k, v in split.extras.items()},
        groups=None if split.groups is None else tuple(np.asarray(split.groups, object)[index]),
    )


def concat(parts: Sequence[Split]) -> Split:
    """One split holding the images of ``parts`` in order (e.g. train + val for retraining).

    Patch image indices are shifted to the merged order. The parts must agree on image size,
    on having a FOV, on patches and patch size, and on their extras.

    Raises:
        ValueError: When the parts do not agree.
    """
    first = parts[0]
    for part in parts[1:]:
        if (
            part.images.shape[1:] != first.images.shape[1:]
            or (part.fov is None) != (first.fov is None)
            or part.patch_size != first.patch_size
            or set(part.extras) != set(first.extras)
        ):
            raise ValueError("splits to concatenate differ in image size, FOV, patches or extras")
    patches = None
    if first.patches is not None:
        offsets = np.cumsum([0, *(len(p.images) for p in parts[:-1])])
        patches = np.concatenate(
            [
                p.patches + np.array([o, 0, 0], p.patches.dtype)
                for p, o in zip(parts, offsets, strict=True)
            ]
        )
    return Split(
        images=np.concatenate([p.images for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        fov=None if first.fov is None else np.concatenate([p.fov for p in parts]),
        names=tuple(name for p in parts for name in p.names),
        patches=patches,
        patch_size=first.patch_size,
        extras={k: np.concatenate([p.extras[k] for p in parts]) for k in first.extras},
        groups=(
            None
            if all(p.groups is None for p in parts)
            else tuple(g for p in parts for g in p.image_groups)
        ),
    )


def blocks(split: Split, names: Sequence[str], sizes: Sequence[int]) -> dict[str, Split]:
    """Consecutive blocks of a split: ``names[i]`` gets the next ``sizes[i]`` images."""
    bounds = np.cumsum([0, *sizes])
    return {
        name: take(split, slice(int(start), int(stop)))
        for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True)
    }


def group_blocks(
    split: Split, keys: Sequence[str], names: Sequence[str], sizes: Sequence[int]
) -> dict[str, Split]:
    """Consecutive blocks of whole groups: ``names[i]`` gets the next ``sizes[i]`` groups.

    ``keys`` holds each image's group; groups come in the order of their first image and the
    images of a group keep their order, so no group is cut between two blocks.
    """
    order = {key: rank for rank, key in enumerate(dict.fromkeys(keys))}
    index = np.array(sorted(range(len(keys)), key=lambda i: order[keys[i]]), dtype=np.int64)
    per_group = np.bincount([order[key] for key in keys], minlength=len(order))
    bounds = np.cumsum([0, *sizes])
    images = [int(per_group[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return blocks(take(split, index), names, images)
