"""Everything that talks to MLflow. No other package imports mlflow.

Runs are addressed by id through ``MlflowClient`` rather than MLflow's global "active run",
so one process can hold a study's parent run and a trial's child run at once, and several
worker processes can share one experiment.

- ``runs``: the store, outages, runs, metrics, artifacts, the UI.
- ``registry``: logged models, registered versions, aliases, ``models:/`` URIs.
"""

import os

# Read by MLflow when it is imported or first makes a request: set before the submodules
# import it, unless the user set them.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# MLflow prints a link to stdout for every run ended on a server; the table has the ids.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mapnet_tune.tracking.registry import ModelVersionInfo, Tracker  # noqa: E402
from mapnet_tune.tracking.runs import git_sha, store_exists  # noqa: E402

__all__ = [
    "ModelVersionInfo",
    "Tracker",
    "git_sha",
    "store_exists",
]
