"""The environment defaults, read in this one place.

Every store has an embedded default in the working directory, so the main job runs on a
fresh machine with nothing started; an environment variable points at a server instead, and
a command-line option beats both.
"""

from __future__ import annotations

import os
from pathlib import Path

STORAGE_ENV = "MAPNET_TUNE_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
CACHE_ENV = "MAPNET_TUNE_CACHE"
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_CACHE = Path(".mapnet-tune") / "cache"


def resolve_storage(storage: str | None) -> str:
    """``storage``, else ``$MAPNET_TUNE_STORAGE``, else ``sqlite:///optuna.db`` in the cwd."""
    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store in the cwd."""
    return uri or os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def default_cache_dir() -> Path:
    """``$MAPNET_TUNE_CACHE``, or ``./.mapnet-tune/cache``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
