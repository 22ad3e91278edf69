"""One machine, several GPUs: one ``mapnet-tune search`` worker process per GPU slot.

The launcher adds nothing to Optuna's and MLflow's distributed mode: it starts the worker a
person would start by hand, once per slot, pinned to its GPU with CUDA_VISIBLE_DEVICES, and
relays Ctrl-C and SIGTERM to all of them. Workers on other machines join the same study the
same way, by pointing at the same storage and tracking server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna

from mapnet_tune.errors import UserError
from mapnet_tune.settings import resolve_tracking_uri
from mapnet_tune.storage import load_existing_study, open_storage
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.tracking import Tracker


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its GPU, its command line, and the environment it adds."""

    gpu: str
    argv: list[str]
    env: dict[str, str]


def parse_gpus(text: str) -> list[str]:
    """GPU indices from ``--gpus 0,1,3``.

    Raises:
        UserError: For anything but distinct non-negative integers separated by commas.
    """
    gpus = [g.strip() for g in text.split(",")]
    if not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise UserError(
            f"--gpus '{text}' must list distinct GPU indices, e.g. --gpus 0,1,2,3 "
            f"(see nvidia-smi for the indices)"
        )
    return gpus


def check_shared_stores(req: SearchRequest, option: str = "--gpus") -> None:
    """Refuse stores that several worker processes cannot write to at once.

    PostgreSQL and journal files (``journal:///``, made for many writers) pass.

    Args:
        req: The search, with its storage and tracking URI.
        option: The option that asks for several workers, for the message.

    Raises:
        UserError: For an SQLite Optuna storage or MLflow store.
    """
    why = (
        "several worker processes write to it at once, and SQLite locks the whole file "
        "for each write, so workers stall and fail with 'database is locked'"
    )
    if req.storage.startswith("sqlite"):
        raise UserError(
            f"{option} needs a shared Optuna storage, not SQLite: {why}; start "
            f"PostgreSQL (docker compose up -d postgres, see docs/deploy.md) and pass "
            f"--storage postgresql+psycopg2://USER@HOST/DB, or pass --storage "
            f"journal:////shared/path/study.log, or set MAPNET_TUNE_STORAGE"
        )
    if resolve_tracking_uri(req.tracking_uri).startswith("sqlite"):
        raise UserError(
            f"{option} needs an MLflow tracking server, not SQLite: {why}; start one "
            f"(docker compose up -d mlflow, see docs/deploy.md) and pass "
            f"--tracking-uri http://HOST:5000 or set MLFLOW_TRACKING_URI"
        )


def worker_specs(req: SearchRequest, gpus: Sequence[str], per_gpu: int) -> list[WorkerSpec]:
    """The worker processes for ``--gpus`` with ``per_gpu`` slots on each GPU.

    Each runs the same ``search`` without ``--gpus``. The storage and tracking URLs travel
    in the environment, not on the command line, where other users of the machine could
    read any password in them.
    """
    base = [
        sys.executable,
        "-m",
        "mapnet_tune.cli",
        "search",
        "--config",
        str(Path(req.study.path).resolve()),
        "--study",
        req.study_name,
        "--trials",
        str(req.trials),
        "--heartbeat-interval",
        str(req.heartbeat_s),
        "--grace-period",
        str(req.grace_s),
    ]
    if req.timeout_s is not None:
        base += ["--timeout", f"{req.timeout_s:g}s"]
    if req.source is not None:
        base += ["--source", str(Path(req.source).resolve())]
    env = {
        "MAPNET_TUNE_STORAGE": req.storage,
        "MLFLOW_TRACKING_URI": resolve_tracking_uri(req.tracking_uri),
    }
    if req.warm_start is not None:
        # Every worker gets it: the one that creates the study copies, the others check.
        base += ["--warm-start", req.warm_start]
        env["MAPNET_TUNE_WARM_STORAGE"] = req.warm_storage
    specs = []
    for gpu in gpus:
        for _ in range(per_gpu):
            argv = list(base)
            # One worker queues the file; the others would only find its entries there.
            if req.enqueue is not None and not specs:
                argv += ["--enqueue", str(req.enqueue.resolve())]
            specs.append(WorkerSpec(gpu, argv, {**env, "CUDA_VISIBLE_DEVICES": gpu}))
    return specs


def run_workers(req: SearchRequest, gpus: Sequence[str], per_gpu: int) -> optuna.Study:
    """Run one worker per GPU slot until all have stopped; return the study.

    Ctrl-C and SIGTERM reach the launcher alone (the workers run in their own sessions) and
    are relayed once to every worker, which re-queues its running trial and stops.

    Raises:
        UserError: Before starting any worker when a store is SQLite or unreachable; after,
            when a worker exited with an error (its own message is above).
        KeyboardInterrupt: After the workers stopped on Ctrl-C or SIGTERM.
    """
    if req.device is not None:
        raise UserError(
            "--device does not go with --gpus, which pins each worker to its GPU; drop --device"
        )
    check_shared_stores(req)
    Tracker(req.tracking_uri).check_reachable()
    open_storage(req.storage, heartbeat=False)
    specs = worker_specs(req, gpus, per_gpu)
    procs: list[subprocess.Popen] = []
    stopped: list[int] = []

    def relay(signum: int, frame: object) -> None:
        stopped.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, relay) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for spec in specs:
            # Each worker prints its own progress on stderr; the launcher prints the table.
            procs.append(
                subprocess.Popen(
                    spec.argv,
                    env={**os.environ, **spec.env},
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        codes = [proc.wait() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        raise KeyboardInterrupt
    failed = [(spec, code) for spec, code in zip(specs, codes, strict=True) if code != 0]
    if failed:
        listed = ", ".join(f"GPU {spec.gpu} (status {code})" for spec, code in failed)
        raise UserError(
            f"{len(failed)} of {len(specs)} workers failed: {listed}; their messages are above"
        )
    return load_existing_study(req.storage, req.study_name)
