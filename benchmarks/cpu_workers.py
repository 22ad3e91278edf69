"""Several search workers on one CPU-only machine: each with all the cores, or with its share.

PyTorch starts one intra-op thread per core in every process. Two workers on one machine
then run twice as many busy threads as there are cores, and each step waits on threads the
other process holds. ``mapnet-tune search --executor local --workers N`` gives each worker
``OMP_NUM_THREADS`` = cores / N unless the user exported it; this measures what that buys.

Each row is one real ``mapnet-tune search`` command, timed end to end (start-up included),
against a journal-file Optuna storage and a real ``mlflow server`` on SQLite (the tests'
``MlflowServer``, importable from a ``make setup`` checkout), in a fresh working directory,
on the shipped synthetic study shrunk to ``SHRINK``:

    1 worker          plain ``search``, one process with every core;
    2 workers, all    ``--executor local --workers 2 --wait`` with OMP_NUM_THREADS = cores;
    2 workers, share  the same with OMP_NUM_THREADS unset, so each gets cores / 2.

Usage:
    python benchmarks/cpu_workers.py [--trials 8] [--repeats 3] [--append docs/benchmarks.md]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from study import REPO, Shrink, write_study_file
from throughput import report_header

from tests.conftest import MlflowServer

BIN = Path(sys.executable).parent
SHRINK = Shrink(width=0.125, epochs=2, steps_per_epoch=4)
#: (row label, extra search options, OMP_NUM_THREADS or None to leave it unset)
MODES = (
    ("1 worker", (), None),
    ("2 workers, all cores each", ("--executor", "local", "--workers", "2", "--wait"), "all"),
    ("2 workers, a share each", ("--executor", "local", "--workers", "2", "--wait"), None),
)


def timed_search(
    folder: Path, study: Path, name: str, trials: int, url: str, extra: Sequence[str], omp: str
) -> float:
    """Seconds one ``mapnet-tune search`` command takes to finish ``trials`` trials."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(MAPNET_TUNE_CACHE=str(folder / "cache"), NO_ALBUMENTATIONS_UPDATE="1")
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    argv = [str(BIN / "mapnet-tune"), "search", "--config", str(study), "--study", name]
    argv += ["--trials", str(trials), "--storage", f"journal:///{folder / 'journal.log'}"]
    argv += ["--tracking-uri", url, *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def run(trials: int, repeats: int) -> list[tuple[str, str, list[float]]]:
    """Time every mode ``repeats`` times, interleaved so that drifts in load hit all alike."""
    cores = len(os.sched_getaffinity(0))
    times: dict[str, list[float]] = {label: [] for label, _, _ in MODES}
    with tempfile.TemporaryDirectory(prefix="mapnet-cpu-workers-") as tmp:
        folder = Path(tmp)
        study = folder / "study.yaml"
        write_study_file(REPO / "studies" / "synthetic.yaml", study, SHRINK)
        server = MlflowServer(f"sqlite:///{folder / 'mlflow.db'}", folder)
        server.start()
        try:
            # One untimed trial prepares the dataset cache that every run then shares.
            timed_search(folder, study, "warm-up", 1, server.url, (), None)
            for repeat in range(repeats):
                for i, (label, extra, omp) in enumerate(MODES):
                    threads = str(cores) if omp == "all" else omp
                    name = f"r{repeat}-m{i}"
                    times[label].append(
                        timed_search(folder, study, name, trials, server.url, extra, threads)
                    )
        finally:
            server.stop()
    share = max(1, cores // 2)
    threads = {MODES[0][0]: str(cores), MODES[1][0]: str(cores), MODES[2][0]: str(share)}
    return [(label, threads[label], times[label]) for label, _, _ in MODES]


def report(rows: list[tuple[str, str, list[float]]], trials: int, repeats: int) -> str:
    """The Markdown section: setup, then one row per mode."""
    lines = [
        *report_header(torch.device("cpu"), "Search workers sharing one CPU"),
        f"- python {platform.python_version()}",
        f"- study: studies/synthetic.yaml with width {SHRINK.width}, {SHRINK.epochs} epochs of "
        f"{SHRINK.steps_per_epoch} steps; {trials} trials per command; journal storage and "
        "an `mlflow server` on SQLite",
        f"- timing: the whole command, start-up included; {repeats} repeats, interleaved",
        "",
        "| workers | threads per worker | wall (s), median | each repeat (s) | trials/min |",
        "|---|---:|---:|---|---:|",
    ]
    for label, threads, seconds in rows:
        median = statistics.median(seconds)
        each = ", ".join(f"{s:.1f}" for s in seconds)
        rate = trials * 60 / median
        lines.append(f"| {label} | {threads} | {median:.1f} | {each} | {rate:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, run, print the report and optionally append it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append", type=Path, default=None)
    args = parser.parse_args(argv)
    text = report(run(args.trials, args.repeats), args.trials, args.repeats)
    print(text)
    if args.append is not None:
        with open(args.append, "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
