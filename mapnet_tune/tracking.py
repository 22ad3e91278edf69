"""Everything that talks to MLflow. No other module imports mlflow.

Runs are addressed by id through ``MlflowClient`` rather than MLflow's global "active run",
so one process can hold a study's parent run and a trial's child run at once, and several
worker processes can share one experiment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mapnet_tune.errors import UserError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402

logging.getLogger("mlflow").setLevel(logging.WARNING)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_ROLE = "study"
# MLflow caps a param value at 6000 characters; ours are short, but fail loudly, not silently.
_MAX_PARAM = 6000


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store in the cwd."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _hide_password(uri: str) -> str:
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return uri


class Tracker:
    """A study's view of one MLflow tracking store.

    Args:
        tracking_uri: An ``http(s)://`` server or a database URI; see
            :func:`resolve_tracking_uri`.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def check_reachable(self) -> None:
        """Fail fast, before any training, when the tracking server cannot be reached.

        Raises:
            UserError: One line naming the server and what to do.
        """
        if not self.uri.startswith(("http://", "https://")):
            return
        url = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"MLflow tracking server {_hide_password(self.uri)} is not reachable ({reason}); "
                f"start it (e.g. `mlflow server`) or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            ) from None

    def experiment(self, name: str) -> str:
        """The id of the experiment ``name``, created if missing (race-safe across workers)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, tags={"mapnet_tune.kind": "study"})
        except mlflow.exceptions.MlflowException:
            # Another worker created it between our lookup and our create.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def create_run(self, experiment_id: str, name: str, tags: Mapping[str, str],
                   parent_run_id: str | None = None) -> str:
        """Start a run and return its id; a child when ``parent_run_id`` is given."""
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=name)
        return run.info.run_id

    def delete_run(self, run_id: str) -> None:
        """Mark a run deleted (used when two workers raced to create the same parent)."""
        self.client.delete_run(run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log parameters; values become strings as MLflow stores them."""
        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a run."""
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log one step of metrics (NaN values are skipped: MLflow plots them badly)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and np.isfinite(v)]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
        """Store an RGB uint8 image as a PNG artifact."""
        self.client.log_image(run_id, image, artifact_file=artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store a text artifact."""
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file as an artifact."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run as FINISHED, KILLED (pruned or interrupted) or FAILED, with the reason."""
        if reason:
            self.set_tags(run_id, {"mapnet_tune.end_reason": reason[:5000]})
        self.client.set_terminated(run_id, status=RunStatus.to_string(getattr(RunStatus, status)))

    def run_status(self, run_id: str) -> str:
        """FINISHED, RUNNING, KILLED, FAILED or SCHEDULED."""
        return self.client.get_run(run_id).info.status

    def find_runs(self, experiment_id: str, filter_string: str) -> list:
        """Runs of an experiment matching an MLflow filter, oldest first."""
        runs = self.client.search_runs([experiment_id], filter_string=filter_string,
                                       max_results=5000, order_by=["attributes.start_time ASC"])
        return list(runs)

    def run_metrics_history(self, run_id: str, key: str) -> list[float]:
        """The logged values of one metric, by step."""
        return [m.value for m in sorted(self.client.get_metric_history(run_id, key),
                                        key=lambda m: m.step)]

    def system_metrics(self, run_id: str):
        """A started monitor that logs GPU/CPU utilisation to the run; call ``.finish()``.

        Returns None when the monitor cannot run (no psutil/pynvml).
        """
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            return None
        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=self.uri)
        monitor.start()
        return monitor

    def ui_command(self) -> str:
        """The command a person runs to browse this store."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri}"
        return f"mapnet-tune ui --tracking-uri {self.uri}"

    def serve_ui(self, host: str, port: int) -> int:
        """Run the MLflow UI on this store in the foreground; returns its exit status."""
        if self.uri.startswith(("http://", "https://")):
            raise UserError(f"{self.uri} is already a tracking server; open it in a browser")
        cmd = ["mlflow", "server", "--backend-store-uri", self.uri, "--host", host,
               "--port", str(port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        return subprocess.call(cmd, env=env)


def git_sha() -> str:
    """The commit of the code that runs, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
