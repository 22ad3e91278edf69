"""Content fingerprints and an atomic on-disk cache of prepared datasets.

A cache entry is the folder ``<cache_dir>/<name>-<fingerprint>/`` holding one uncompressed
``<split>.npz`` per split, ``meta.json`` and, written last, ``COMPLETE``. Entries are built in
a temporary folder next to it and renamed into place, so a reader never sees half an entry;
a folder without ``COMPLETE`` is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mapnet_tune.data.base import PreparedDataset, Scan, Split
from mapnet_tune.data.io import read_all
from mapnet_tune.errors import UserError

log = logging.getLogger(__name__)

# Bump when preprocessing or the entry format changes, so old entries are not reused. It is
# part of every fingerprint, so a bump changes the fingerprint of every dataset. Entries
# written before splits recorded their groups lack the "groups" key and are rebuilt on load.
FORMAT_VERSION = 1
MARKER = "COMPLETE"
# Files up to this size are hashed in full. Larger ones (whole ISIC photographs) are hashed by
# size, modification time and their first and last MiB, which keeps a cached prepare fast.
FULL_HASH_LIMIT = 4 << 20
EDGE_BYTES = 1 << 20
_EXTRA_PREFIX = "extra__"


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (or of its size, mtime and edges when it is large)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if stat.st_size <= FULL_HASH_LIMIT:
            return hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(handle.read(EDGE_BYTES))
        handle.seek(-EDGE_BYTES, os.SEEK_END)
        digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def fingerprint(name: str, options: Mapping, scan: Scan) -> str:
    """16 hex characters of sha256 over the dataset name, the format version, the options and
    every input file's relative path, size and content hash."""
    digest = hashlib.sha256()
    header = {"dataset": name, "format": FORMAT_VERSION, "options": options}
    digest.update(json.dumps(header, sort_keys=True).encode())
    files = sorted(scan.files)
    for path, content in zip(files, read_all(file_digest, files), strict=True):
        relative = path.relative_to(scan.root).as_posix() if scan.root else str(path)
        digest.update(f"\n{relative}\t{path.stat().st_size}\t{content}".encode())
    return digest.hexdigest()[:16]


def entry_dir(cache_dir: Path, name: str, fp: str) -> Path:
    """The folder of a cache entry."""
    return Path(cache_dir) / f"{name}-{fp}"


def load(cache_dir: Path, name: str, fp: str) -> PreparedDataset | None:
    """The cached dataset, or None when there is no complete, readable entry for it.

    An entry that cannot be read (damaged since it was written) is removed, to be rebuilt.
    """
    folder = entry_dir(cache_dir, name, fp)
    if not (folder / MARKER).is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"cache format {meta.get('format')}, expected {FORMAT_VERSION}")
        splits = {
            split_name: _load_split(folder / f"{split_name}.npz", info)
            for split_name, info in meta["splits"].items()
        }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("rebuilding the unreadable cache entry %s (%s)", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return PreparedDataset(name, fp, meta["channels"], splits, meta["settings"])


def save(cache_dir: Path, dataset: PreparedDataset) -> Path:
    """Write a dataset as a complete cache entry, atomically; returns the entry's folder.

    When another process finished the same entry first, its entry is kept.

    Raises:
        UserError: When the cache folder cannot be written (permissions, full disk).
    """
    cache_dir = Path(cache_dir)
    final = entry_dir(cache_dir, dataset.name, dataset.fingerprint)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
    except OSError as err:
        raise _unwritable(cache_dir, err) from err
    try:
        _write_entry(temporary, dataset)
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final)  # a stale, incomplete entry
        try:
            os.replace(temporary, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
    except OSError as err:
        raise _unwritable(cache_dir, err) from err
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def _write_entry(folder: Path, dataset: PreparedDataset) -> None:
    # mkdtemp makes a private folder; the entry should be as readable as any other file.
    folder.chmod(0o755)
    for split_name, split in dataset.splits.items():
        np.savez(folder / f"{split_name}.npz", **_split_arrays(split))
    meta = {
        "format": FORMAT_VERSION,
        "name": dataset.name,
        "fingerprint": dataset.fingerprint,
        "channels": dataset.channels,
        "settings": dataset.settings,
        "splits": {
            k: {
                "names": list(s.names),
                "patch_size": s.patch_size,
                "groups": None if s.groups is None else list(s.groups),
            }
            for k, s in dataset.splits.items()
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    (folder / MARKER).write_text("")


def _unwritable(cache_dir: Path, err: OSError) -> UserError:
    return UserError(
        f"cannot write the dataset cache in {cache_dir}: {err}; free some disk space or set "
        "MAPNET_TUNE_CACHE to a writable folder"
    )


def _split_arrays(split: Split) -> dict[str, np.ndarray]:
    arrays = {"images": split.images, "masks": split.masks}
    if split.fov is not None:
        arrays["fov"] = split.fov
    if split.patches is not None:
        arrays["patches"] = split.patches
    arrays.update({_EXTRA_PREFIX + k: v for k, v in split.extras.items()})
    return arrays


def _load_split(path: Path, info: Mapping) -> Split:
    with np.load(path) as arrays:
        data = {key: arrays[key] for key in arrays.files}
    return Split(
        images=data["images"],
        masks=data["masks"],
        fov=data.get("fov"),
        names=tuple(info["names"]),
        patches=data.get("patches"),
        patch_size=info["patch_size"],
        extras={
            k.removeprefix(_EXTRA_PREFIX): v for k, v in data.items() if k.startswith(_EXTRA_PREFIX)
        },
        groups=None if info["groups"] is None else tuple(info["groups"]),
    )
