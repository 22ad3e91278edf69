"""Reading image files and pairing them by name, with errors that name the file."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from PIL import Image

from mapnet_tune.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")

# Decoders report damaged files with several exception types; all of them mean "bad file".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)

T = TypeVar("T")
R = TypeVar("R")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file fully into an array (see :func:`decode_image`).

    Raises:
        UserError: Naming the file when it is missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file {path} does not exist")
    return decode_image(path, str(path))


def decode_image(source: str | Path | IO[bytes], name: str = "") -> np.ndarray:
    """Decode an image file, from a path or a binary stream, fully into an array.

    Greyscale and palette images with grey palettes come back as (H, W); colour images as
    (H, W, 3) uint8 (alpha dropped); 16-bit and float images keep their values.

    Args:
        source: A path, or a stream of the file's bytes.
        name: How the error names the image.

    Raises:
        UserError: When the bytes are truncated, damaged or not an image.
    """
    try:
        with Image.open(source) as image:
            # load() decodes every byte now, so a truncated file fails here, not later.
            image.load()
            return _to_array(image)
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
        raise UserError(
            f"cannot read image {name}: {err}. The file is damaged, truncated or not an image; "
            "replace it with an intact copy"
        ) from err


def _to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("1", "L", "LA", "La"):
        return np.array(image.convert("L"))
    if image.mode in ("P", "PA"):
        rgb = np.array(image.convert("RGB"))
        grey_palette = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        return np.ascontiguousarray(rgb[..., 0]) if grey_palette else rgb
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image)
        return array.astype(array.dtype.newbyteorder("="))
    return np.array(image.convert("RGB"))


def read_all(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(item) for item in items]`` on a thread pool (image decoding drops the GIL).

    The first error in item order is raised, as a plain loop would.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def require_dir(root: Path, relative: str, layout: str) -> Path:
    """``root / relative``, which must be a folder.

    Args:
        root: The source folder given by the user.
        relative: The folder the official layout expects, relative to ``root``.
        layout: A description of the official layout for the error message.

    Raises:
        UserError: Naming the missing folder and the expected layout.
    """
    folder = root / relative
    if not folder.is_dir():
        raise UserError(
            f"missing folder {relative}/ in {root}: the official layout is {layout}; "
            "point the source at the folder that contains it"
        )
    return folder


def require_source(source: Path | None, dataset: str) -> Path:
    """The source folder, which must exist.

    Raises:
        UserError: When no source was given or it is not a folder.
    """
    if source is None:
        raise UserError(
            f"dataset {dataset} needs a source folder: pass --source PATH, or run "
            f"`mapnet-tune prepare --dataset {dataset} --source PATH` once"
        )
    if not source.is_dir():
        raise UserError(
            f"source folder {source} for dataset {dataset} does not exist; pass "
            f"--source with the folder you downloaded the dataset to"
        )
    return source


def list_images(folder: Path) -> list[Path]:
    """The image files in a folder (by extension, hidden files skipped), sorted by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and path.is_file()
    )


@dataclass(frozen=True)
class Role:
    """One folder of a layout whose files pair up by a key taken from the file name.

    Attributes:
        folder: The folder.
        what: What its files are, for messages ("image", "manual segmentation", ...).
        pattern: Regular expression over the file stem; its first group is the key.
        expected: Format string giving the expected file name from the key, e.g. "{}_manual1.gif".
    """

    folder: Path
    what: str
    pattern: str
    expected: str

    def keyed(self) -> dict[str, Path]:
        """Key -> file for every image file in the folder.

        Raises:
            UserError: For a file that does not follow the naming or two files with one key.
        """
        files: dict[str, Path] = {}
        for path in list_images(self.folder):
            match = re.fullmatch(self.pattern, path.stem)
            if match is None:
                raise UserError(
                    f"{path} does not follow the expected naming {self.expected.format('ID')}; "
                    f"rename it or move it out of {self.folder}"
                )
            key = match.group(1)
            if key in files:
                raise UserError(
                    f"{files[key]} and {path} are two {self.what} files for {key}; keep one"
                )
            files[key] = path
        return files


def pair_files(roles: Sequence[Role]) -> list[tuple[Path, ...]]:
    """Pair the files of several folders by key, sorted by the first folder's file names.

    Raises:
        UserError: For a file of the first folder without its partner in another folder or the
            reverse, naming the file and the expected partner.
    """
    keyed = [role.keyed() for role in roles]
    first, primary = roles[0], keyed[0]
    if not primary:
        raise UserError(f"no {first.what} files ({' '.join(IMAGE_EXTENSIONS)}) in {first.folder}")
    for role, files in zip(roles[1:], keyed[1:], strict=True):
        for key, path in sorted(primary.items()):
            if key not in files:
                raise UserError(
                    f"{first.what} {path} has no {role.what}: expected "
                    f"{role.folder / role.expected.format(key)}"
                )
        for key, path in sorted(files.items()):
            if key not in primary:
                raise UserError(
                    f"{role.what} {path} has no {first.what}: expected "
                    f"{first.folder / first.expected.format(key)} (or remove the file)"
                )
    order = sorted(primary, key=lambda key: primary[key].name)
    return [tuple(files[key] for files in keyed) for key in order]
