"""Runs on an MLflow tracking store: reachability, outages, runs, metrics, artifacts, the UI.

Runs are addressed by id through ``MlflowClient`` rather than MLflow's global "active run",
so one process can hold a study's parent run and a trial's child run at once, and several
worker processes can share one experiment. MLflow's environment defaults are set by the
package's ``__init__``, which runs before this module imports mlflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag

from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.settings import resolve_tracking_uri
from mapnet_tune.tracking.links import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    SHARED_VIEW_TAG,
    VIEW_KEY,
)

logging.getLogger("mlflow").setLevel(logging.WARNING)
# The HTTP client logs each retry of a failed request; an outage gets one line of our own.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

# MLflow caps a param value at 6000 characters; ours are short, but fail loudly, not silently.
_MAX_PARAM = 6000
# How long writes are dropped without trying after the tracking server was found unreachable.
_RETRY_S = 15.0


def store_exists(uri: str | None) -> bool:
    """Whether a tracking store is there to read: a server, or an existing SQLite file.

    Read-only commands use it so as not to create an empty ``mlflow.db`` as a side effect.
    """
    resolved = resolve_tracking_uri(uri)
    if not resolved.startswith("sqlite:///"):
        return True
    return Path(resolved.removeprefix("sqlite:///")).is_file()


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


class RunTracker:
    """A study's view of one MLflow tracking store: its runs (see :class:`Tracker`).

    Args:
        tracking_uri: An ``http(s)://`` server or a database URI; see
            :func:`resolve_tracking_uri`.
        tolerate_outages: For long-running workers: when the server cannot be reached, writes
            to runs are skipped (with one warning) instead of raising, and final run statuses
            are held back until :meth:`flush_pending` can deliver them.
    """

    def __init__(self, tracking_uri: str | None = None, tolerate_outages: bool = False) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.tolerate_outages = tolerate_outages
        self._down_since: float | None = None
        self._pending: dict[str, tuple[str, str | None]] = {}

    def check_reachable(self) -> None:
        """Fail fast, before any training, when the tracking server cannot be reached.

        Raises:
            UserError: One line naming the server and what to do, also when the server
                refuses the credentials.
        """
        reason = self.outage()
        if reason is not None:
            raise UserError(
                f"MLflow tracking server {redact_url(self.uri)} is not reachable ({reason}); "
                f"start it (e.g. `mlflow server`) or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            )
        if not self.uri.startswith(("http://", "https://")):
            return
        try:
            self.client.search_experiments(max_results=1)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                raise
            raise UserError(
                f"MLflow tracking server {redact_url(self.uri)} refused the credentials; "
                f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account it "
                f"knows"
            ) from None

    def outage(self) -> str | None:
        """Why the tracking server does not answer its health check, or None when it does.

        Always None for a database URI, which has no server of its own to lose.
        """
        if not self.uri.startswith(("http://", "https://")):
            return None
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            return str(getattr(exc, "reason", exc))
        return None

    def _write(self, call: Callable[[], object]) -> None:
        """Run one write to a run; with ``tolerate_outages``, an outage skips it.

        While the server is down, writes are dropped without a call for ``_RETRY_S`` at a
        time, so that a trial is not slowed by the client's retries on every epoch.
        """
        if not self.tolerate_outages:
            call()
            return
        if self._down_since is not None and time.monotonic() - self._down_since < _RETRY_S:
            return
        try:
            call()
        except Exception:
            reason = self.outage()
            if reason is None:
                raise
            if self._down_since is None:
                _warn(
                    f"MLflow tracking server {redact_url(self.uri)} is unreachable "
                    f"({reason}); logging is skipped until it returns, training goes on"
                )
            self._down_since = time.monotonic()
            return
        if self._down_since is not None:
            _warn(f"MLflow tracking server {redact_url(self.uri)} is back; logging resumed")
            self._down_since = None

    def experiment(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        """The id of the experiment ``name``, created if missing (race-safe across workers).

        It is tagged as model development (``mlflow.experimentKind``), so that MLflow shows
        it in its model-training view; experiments made before that get the tag now.
        """
        wanted = {"mapnet_tune.kind": "study", EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **(tags or {})}
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, tags=wanted)
            except mlflow.exceptions.MlflowException:
                # Another worker created it between our lookup and our create.
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        for key, value in wanted.items():
            if found.tags.get(key) != value:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def show_study(self, experiment_id: str, view: str) -> None:
        """Store the study's runs-page view (see :mod:`mapnet_tune.tracking.links`)."""
        self.set_experiment_tags(experiment_id, {SHARED_VIEW_TAG + VIEW_KEY: view})

    def set_experiment_tags(self, experiment_id: str, tags: Mapping[str, str]) -> None:
        """Set tags on an experiment."""
        for key, value in tags.items():
            self._write(lambda k=key, v=value: self.client.set_experiment_tag(experiment_id, k, v))

    def create_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        *,
        source: str,
    ) -> str:
        """Start a run and return its id; a child when ``parent_run_id`` is given.

        ``source`` is the command that made it (``mapnet-tune search``): with the git commit
        it fills the Source column of MLflow's runs table.
        """
        all_tags = {
            "mlflow.source.name": source,
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_sha(),
            **tags,
        }
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
            self._write(lambda i=i: self.client.log_batch(run_id, params=items[i : i + 100]))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a run."""
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._write(lambda: self.client.log_batch(run_id, tags=items))

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int, model_id: str | None = None
    ) -> None:
        """Log one step of metrics (NaN values are skipped: MLflow plots them badly).

        With ``model_id`` they belong to that logged model too, and its page shows them.
        """
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step, model_id=model_id)
            for k, v in metrics.items()
            if v is not None and np.isfinite(v)
        ]
        if items:
            self._write(lambda: self.client.log_batch(run_id, metrics=items))

    def log_dataset(
        self, run_id: str, name: str, digest: str, source: str, context: str = "training"
    ) -> None:
        """Record the data a run used as an MLflow dataset input (the Dataset column).

        Args:
            name: The dataset, e.g. ``drive``.
            digest: The prepared cache's fingerprint, so that runs on the same data match.
            source: Where the data came from: its folder, or the built-in generator.
            context: What the run did with it (``training``, ``evaluation``).
        """
        dataset = Dataset(name=name, digest=digest, source_type="local", source=source)
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]

        def log() -> None:
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except mlflow.exceptions.MlflowException:
                # Workers starting together race to create the experiment's one dataset
                # record and the loser's insert fails; once it exists, linking it works.
                time.sleep(0.5)
                self.client.log_inputs(run_id, datasets=inputs)

        self._write(log)

    def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
        """Store an RGB uint8 image as a PNG artifact."""
        self._write(lambda: self.client.log_image(run_id, image, artifact_file=artifact_file))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store a text artifact."""
        self._write(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file as an artifact."""
        self._write(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def end_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run as FINISHED, KILLED (pruned or interrupted) or FAILED, with the reason.

        With ``tolerate_outages``, a status the server cannot take now is held back and sent
        by a later :meth:`flush_pending`, so the run is not left RUNNING for good.
        """
        if not self.tolerate_outages:
            self._terminate(run_id, status, reason)
            return
        self._pending[run_id] = (status, reason)
        if self._down_since is None or time.monotonic() - self._down_since >= _RETRY_S:
            self.flush_pending()
        if run_id in self._pending:
            _warn(
                f"MLflow run {run_id} stays RUNNING while the tracking server is unreachable; "
                f"it is marked {status} when the server returns"
            )

    def reopen_run(self, run_id: str) -> None:
        """Mark a finished run RUNNING again (a study's parent run when the study resumes)."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def flush_pending(self) -> list[str]:
        """Send the final run statuses that an outage held back.

        Returns:
            The ids of the runs whose status could still not be sent.
        """
        for run_id, (status, reason) in list(self._pending.items()):
            try:
                self._terminate(run_id, status, reason)
            except Exception:
                if self.outage() is None:
                    raise
                self._down_since = time.monotonic()
                break
            del self._pending[run_id]
        return list(self._pending)

    def _terminate(self, run_id: str, status: str, reason: str | None) -> None:
        if reason:
            self.client.set_tag(run_id, "mapnet_tune.end_reason", reason[:5000])
        self.client.set_terminated(run_id, status=RunStatus.to_string(getattr(RunStatus, status)))

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, enabled: bool = True) -> Iterator[None]:
        """Log GPU and CPU utilisation and memory to the run while a block runs.

        Nothing is logged when not ``enabled`` or when the monitor cannot run (no psutil or
        pynvml).
        """
        monitor = None
        if enabled:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            except ImportError:
                pass
            else:
                monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=self.uri)
                monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def serve_ui(self, host: str, port: int) -> NoReturn:
        """Become the MLflow UI on this store (the process is replaced, so that Ctrl-C or a
        SIGTERM reaches the server and it shuts its workers down)."""
        if self.uri.startswith(("http://", "https://")):
            raise UserError(f"{self.uri} is already a tracking server; open it in a browser")
        # The interpreter running us has mlflow; its `mlflow` script need not be on PATH.
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.uri,
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        sys.stdout.flush()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        os.execve(sys.executable, cmd, env)


def git_sha() -> str:
    """The commit of the code that runs, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Raise one logger's level to ERROR for the duration of a block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
