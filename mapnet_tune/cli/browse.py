"""Browsing a study: ``ui`` (the MLflow UI) and ``dashboard`` (optuna-dashboard)."""

from __future__ import annotations

import click

from mapnet_tune.cli.options import HOST, STORAGE, TRACKING_URI


@click.command()
@TRACKING_URI
@HOST
@click.option("--port", type=int, default=5000, show_default=True)
def ui(tracking_uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI on the configured store; print where each study is in it."""
    from mapnet_tune.tracking import Tracker, store_exists

    tracker = Tracker(tracking_uri)
    click.echo(f"MLflow UI for {tracker.uri} at http://{host}:{port} (Ctrl-C stops it)")
    if store_exists(tracking_uri):
        # A server listening on every interface is still browsed through this machine.
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        for line in tracker.study_links(ui=f"http://{shown}:{port}"):
            click.echo(line)
    tracker.serve_ui(host, port)


@click.command()
@STORAGE
@HOST
@click.option("--port", type=int, default=8080, show_default=True)
def dashboard(storage: str | None, host: str, port: int) -> None:
    """Start optuna-dashboard on the study storage: every study's live plots."""
    from mapnet_tune.dashboard import serve

    serve(storage, host, port)
