"""What one ``mapnet-tune search`` worker is asked to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mapnet_tune.config import StudyConfig, default_study_file, load_study
from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.settings import resolve_storage
from mapnet_tune.storage import GRACE_S, HEARTBEAT_S


class StudyTimeout(KeyboardInterrupt):
    """``--timeout`` ran out mid-trial. Handled like Ctrl-C: the trial is re-queued."""


@dataclass(frozen=True)
class SearchRequest:
    """Everything one ``mapnet-tune search`` worker needs.

    ``warm_start`` names a finished study in ``warm_storage`` whose trials seed a new study.
    """

    study: StudyConfig
    study_name: str
    storage: str
    tracking_uri: str | None
    trials: int
    timeout_s: float | None = None
    enqueue: Path | None = None
    source: str | None = None
    device: str | None = None
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S
    warm_start: str | None = None
    warm_storage: str | None = None


def default_study_name(study: StudyConfig) -> str:
    """The dataset name for a shipped study file, else ``<dataset>-<file stem>``."""
    stem = Path(study.path).stem
    return stem if stem == study.dataset.name else f"{study.dataset.name}-{stem}"


def search_request(
    *,
    dataset: str | None,
    config_path: str | None,
    study_name: str | None,
    storage: str | None,
    heartbeat_interval: int,
    grace_period: int,
    warm_start: str | None = None,
    warm_storage: str | None = None,
    **rest,
) -> SearchRequest:
    """The request of ``mapnet-tune search``: the study file (shipped or given) and defaults.

    Raises:
        UserError: Neither a dataset nor a study file, a dataset that is not the file's, or
            a warm start from the study itself.
    """
    if not dataset and not config_path:
        raise UserError("search needs --dataset NAME or --config FILE")
    study = load_study(config_path or default_study_file(dataset))
    if dataset and dataset != study.dataset.name:
        raise UserError(
            f"--dataset {dataset} does not match dataset.name "
            f"'{study.dataset.name}' in {study.path}; drop one of them"
        )
    name, url = study_name or default_study_name(study), resolve_storage(storage)
    if warm_storage and not warm_start:
        raise UserError("--warm-storage needs --warm-start OLD_STUDY, the study to copy from")
    warm_url = (warm_storage or url) if warm_start else None
    if warm_start == name and warm_url == url:
        raise UserError(
            f"--warm-start {warm_start} names the study being run ({redact_url(url)}); "
            f"pass --study NEW_NAME for the new study"
        )
    return SearchRequest(
        study=study,
        study_name=name,
        storage=url,
        heartbeat_s=heartbeat_interval,
        grace_s=grace_period,
        warm_start=warm_start,
        warm_storage=warm_url,
        **rest,
    )
