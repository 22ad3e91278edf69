"""A regular (non-editable) install runs the shipped study from a folder unrelated to the checkout.

The shipped study files are package data; this builds the project the way ``pip install .``
does, into a private target folder, and runs ``search --dataset synthetic`` with only that
copy importable ahead of the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import optuna
import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BUILD_LEFTOVERS = ("build", "*.egg-info")


def _leftovers() -> set[str]:
    return {p.name for pattern in BUILD_LEFTOVERS for p in ROOT.glob(pattern)}


def _install(target: Path, scratch: Path) -> None:
    """``pip install --target`` from a copy, so that no build/ or egg-info lands in the checkout."""
    # --no-build-isolation builds with this environment's setuptools (the `test` extra).
    assert Version(metadata.version("setuptools")) >= Version("77"), (
        "building needs setuptools>=77; run pip install -e '.[test]'"
    )
    src = scratch / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "mapnet_tune",
        src / "mapnet_tune",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_non_editable_install_runs_the_shipped_study_elsewhere(tmp_path):
    before = _leftovers()
    target, run_dir = tmp_path / "site", tmp_path / "run"
    run_dir.mkdir()
    _install(target, tmp_path)
    assert _leftovers() == before, "the build left files in the checkout"
    shipped = target / "mapnet_tune" / "studies" / "synthetic.yaml"
    assert shipped.read_bytes() == (ROOT / "studies" / "synthetic.yaml").read_bytes()

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "MAPNET_TUNE_STORAGE")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        MAPNET_TUNE_CACHE=str(tmp_path / "cache"),
        NO_ALBUMENTATIONS_UPDATE="1",
    )

    def python(*args: str, timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [sys.executable, *args],
                cwd=run_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:  # e.g. every trial failing, retried until N
            tail = (exc.stderr or b"")[-3000:]
            pytest.fail(
                f"{' '.join(args)} ran past {timeout} s; its stderr ends:\n"
                f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}"
            )

    # The installed copy, not the checkout (the editable install puts it on sys.path), is imported.
    found = python(
        "-c", "import mapnet_tune.config as c; print(c.__file__); print(c.STUDIES_DIR)", timeout=60
    )
    assert found.returncode == 0, found.stderr
    module_file, studies_dir = (Path(line) for line in found.stdout.split())
    assert module_file.is_relative_to(target.resolve()), module_file
    assert studies_dir == (target / "mapnet_tune" / "studies").resolve()

    done = python(
        "-m", "mapnet_tune.cli", "search", "--dataset", "synthetic", "--trials", "1", timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (run_dir / "optuna.db").is_file()
    study = optuna.load_study(study_name="synthetic", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert Path(study.user_attrs["config_file"]).resolve() == shipped.resolve()
    assert len(study.trials) == 1 and study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert _leftovers() == before
