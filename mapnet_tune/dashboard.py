"""``mapnet-tune dashboard``: optuna-dashboard on the study storage, as ``ui`` is for MLflow.

The dashboard reads the same storage the workers write (the embedded ``optuna.db`` by
default), so it shows every study in it live: history, importances, parallel coordinates.
"""

from __future__ import annotations

from pathlib import Path

from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.settings import resolve_storage
from mapnet_tune.storage import open_storage


def serve(storage: str | None, host: str, port: int) -> None:
    """Serve optuna-dashboard until Ctrl-C.

    Raises:
        UserError: When the storage does not exist yet or cannot be opened.
    """
    url = resolve_storage(storage)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no Optuna storage at {url}; run `mapnet-tune search` here first, or pass "
            f"--storage / set MAPNET_TUNE_STORAGE"
        )
    opened = open_storage(url, heartbeat=False, must_exist=True)
    # Imported here: the dashboard and its web server are only needed by this command.
    import optuna_dashboard

    print(
        f"Optuna dashboard for {redact_url(url)} at http://{host}:{port} (Ctrl-C stops it)",
        flush=True,
    )
    try:
        optuna_dashboard.run_server(opened, host=host, port=port)
    except KeyboardInterrupt:
        return
