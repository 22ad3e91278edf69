"""`mapnet-tune ui` serves the embedded store's runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mapnet_tune.tracking import Tracker

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_embedded_store(workdir):
    # ./mlflow.db with one experiment. An absolute URI: MLflow caches one engine per URI
    # per process, so a relative one could still point at an earlier test's folder.
    Tracker(f"sqlite:///{workdir / 'mlflow.db'}").experiment("demo-study")
    port = _free_port()
    # The console script without an activated environment, as a user would start it.
    script = Path(sys.executable).parent / "mapnet-tune"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir)}
    proc = subprocess.Popen(
        [script, "ui", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert "demo-study" in [e["name"] for e in body["experiments"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
