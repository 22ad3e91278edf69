"""What several commands share: options declared once, and small value parsers."""

from __future__ import annotations

import re

import click

from mapnet_tune.data import DATASETS
from mapnet_tune.errors import UserError
from mapnet_tune.settings import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, STORAGE_ENV, TRACKING_ENV

# Their environment defaults are resolved in mapnet_tune.settings, so library callers get the
# same defaults as the command line.
STORAGE = click.option(
    "--storage", help=f"Optuna storage URL [env {STORAGE_ENV}; default {DEFAULT_STORAGE}]."
)
TRACKING_URI = click.option(
    "--tracking-uri",
    help=f"MLflow tracking URI [env {TRACKING_ENV}; default {DEFAULT_TRACKING_URI}].",
)
DEVICE = click.option("--device", help="torch device (default: cuda if present).")
SOURCE = click.option(
    "--source",
    type=click.Path(),
    help="Dataset folder in its official layout (default: the one prepared before).",
)
STUDY = click.option(
    "--study", "study_name", help="Study name (default: the storage's only study)."
)
GRACE_PERIOD = click.option(
    "--grace-period",
    type=click.IntRange(min=2),
    default=90,
    show_default=True,
    envvar="MAPNET_TUNE_GRACE_S",
    metavar="SECONDS",
    help="Silence after which a running trial counts as lost, is failed and re-queued "
    "[env MAPNET_TUNE_GRACE_S].",
)
HOST = click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
DATASET_NAMES = ", ".join(DATASETS)


def duration(value: str | None) -> float | None:
    """Seconds from '90', '90s', '30m', '2h' or '1h30m'; None stays None.

    Raises:
        UserError: For anything else, naming ``--timeout``.
    """
    if value is None:
        return None
    parts = re.fullmatch(
        r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
        r"(?:(\d+(?:\.\d+)?)s?)?\s*",
        value,
    )
    if not value.strip() or parts is None:
        raise UserError(f"--timeout '{value}' is not a duration; use e.g. 600, 30m, 2h or 1h30m")
    h, m, s = (float(p) if p else 0.0 for p in parts.groups())
    return h * 3600 + m * 60 + s


def key_values(pairs: tuple[str, ...]) -> dict:
    """``--option KEY=VALUE`` pairs as a dict, each value read as YAML.

    Raises:
        UserError: For a pair without ``=``.
    """
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--option '{pair}' must look like KEY=VALUE, e.g. input_mode=rgb")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def names(text: str | None, option: str) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of names; None when not given.

    Raises:
        UserError: When the option names nothing.
    """
    if text is None:
        return None
    found = tuple(n.strip() for n in text.split(",") if n.strip())
    if not found:
        raise UserError(f"{option} needs at least one name, e.g. {option} default")
    return found
