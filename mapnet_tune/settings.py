"""The environment defaults, read in this one place.

Every store has an embedded default in the working directory, so the main job runs on a
fresh machine with nothing started; an environment variable points at a server instead, and
a command-line option beats both.
"""

from __future__ import annotations

import os
from pathlib import Path

from mapnet_tune.errors import UserError

STORAGE_ENV = "MAPNET_TUNE_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
CACHE_ENV = "MAPNET_TUNE_CACHE"
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_CACHE = Path(".mapnet-tune") / "cache"
#: Longest silence within an epoch when stderr is not a terminal (logs, CI, cluster jobs).
PROGRESS_ENV = "MAPNET_TUNE_PROGRESS_S"
DEFAULT_PROGRESS_S = 30.0


def resolve_storage(storage: str | None) -> str:
    """``storage``, else ``$MAPNET_TUNE_STORAGE``, else ``sqlite:///optuna.db`` in the cwd."""
    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store in the cwd."""
    return uri or os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def default_cache_dir() -> Path:
    """``$MAPNET_TUNE_CACHE``, or ``./.mapnet-tune/cache``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$MAPNET_TUNE_PROGRESS_S``, else 30.

    Raises:
        UserError: When the variable is set to something that is not a number of seconds.
    """
    raw = os.environ.get(PROGRESS_ENV)
    if raw is None:
        return DEFAULT_PROGRESS_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{PROGRESS_ENV}={raw!r} must be a number of seconds, e.g. 30")
    return value
