"""The tracking client against servers that refuse credentials or go away."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from mapnet_tune.errors import UserError
from mapnet_tune.tracking import Tracker


class _LockedServer(http.server.BaseHTTPRequestHandler):
    """Healthy, but every API call answers 401, as a basic-auth server does to strangers."""

    def do_GET(self) -> None:  # noqa: N802 (the handler's required name)
        healthy = self.path == "/health"
        self.send_response(200 if healthy else 401)
        self.end_headers()
        self.wfile.write(b"OK" if healthy else b"You are not authenticated.")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def locked_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LockedServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_refused_credentials_are_one_clear_error(locked_server):
    with pytest.raises(UserError, match="refused the credentials; set MLFLOW_TRACKING_USERNAME"):
        Tracker(locked_server).check_reachable()


def test_outage_skips_writes_and_holds_the_final_status(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not in seconds
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{sock.getsockname()[1]}"
    tracker = Tracker(gone, tolerate_outages=True)
    tracker.log_metrics("run1", {"val/iou": 0.5}, step=0)
    tracker.log_metrics("run1", {"val/iou": 0.6}, step=1)
    tracker.end_run("run1", "FINISHED")
    assert tracker.flush_pending() == ["run1"]
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "logging is skipped until it returns" in line]) == 1
    assert any("run1 stays RUNNING" in line and "marked FINISHED" in line for line in err)
    with pytest.raises(Exception):  # noqa: B017 (any client error: the store is not there)
        Tracker(gone).log_metrics("run1", {"val/iou": 0.5}, step=0)
