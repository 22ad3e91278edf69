"""Addresses in the MLflow UI that land a person where the study is.

MLflow 3 opens an experiment in its GenAI view (traces, token usage) unless the address asks
for the model-training view with ``workflowType=machine_learning``, and a fresh browser
profile shows no metric columns in the runs table. A study's experiment therefore carries a
*shared view*: MLflow's own mechanism behind the runs page's "Share" button, an experiment
tag ``mlflow.sharedViewState.<key>`` holding the page state (JSON, zlib-compressed, base64,
after ``deflate;``), which an address names with ``viewStateShareKey``. Ours sorts the runs by
the trials' best objective and shows their validation metrics and parameters as columns.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Sequence

WORKFLOW_QUERY = "workflowType=machine_learning"
#: Experiment tag that tells MLflow which kind of work an experiment holds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_KEY = "mapnet-tune-study"
#: Where ``mapnet-tune ui`` serves an embedded store unless told otherwise.
DEFAULT_UI = "http://127.0.0.1:5000"


def ui_base(tracking_uri: str, ui: str = DEFAULT_UI) -> str:
    """The UI's address: the tracking server itself, or ``ui`` for an embedded store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return ui.rstrip("/")


def runs_url(base: str, experiment_id: str) -> str:
    """The study's runs in the model-training view, sorted and with the study's columns."""
    return (
        f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}&viewStateShareKey={VIEW_KEY}"
    )


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (its curves, parameters, overlays) in the model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"


def run_anchor(experiment_id: str, run_id: str) -> str:
    """A link to a run relative to the UI, for Markdown shown inside it."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"


def model_url(base: str, name: str) -> str:
    """A registered model's page: its description and versions."""
    return f"{base}/#/models/{name}?{WORKFLOW_QUERY}"


def study_view(order_by: str, maximize: bool, metrics: Sequence[str], params: Sequence[str]) -> str:
    """The shared-view tag value: runs sorted by ``order_by``, these columns shown.

    Sorting by a metric also lists the trials flat instead of folded under the study's
    parent run, which is what a person comparing trials wants.
    """
    columns = ["attributes.`Run Name`", "attributes.`Dataset`", "attributes.`Source`"]
    columns += [f"metrics.`{m}`" for m in dict.fromkeys([order_by, *metrics])]
    columns += [f"params.`{p}`" for p in params]
    state = {
        "searchFilter": "",
        "orderByKey": f"metrics.`{order_by}`",
        "orderByAsc": not maximize,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runListHidden": False,
    }
    packed = base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    return f"deflate;{packed}"
