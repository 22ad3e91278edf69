"""How ``search --executor`` submits its workers: the options, checked and typed.

Every mistake in them is one line naming the option and the fix, before anything is
submitted.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mapnet_tune.errors import UserError

#: The options of ``search`` that :func:`submission` reads.
SUBMIT_OPTIONS = (
    "executor",
    "workers",
    "wait",
    "slurm_partition",
    "slurm_time",
    "slurm_gpus_per_worker",
    "slurm_options",
    "slurm_requeue",
    "slurm_folder",
)
#: Where submitit keeps each submission's pickles and logs; it replaces ``%A`` by the job
#: (array) id. Relative to the working directory, which SLURM jobs start in, so it must be
#: on a file system the compute nodes share.
DEFAULT_FOLDER = str(Path(".mapnet-tune") / "slurm" / "%A")
# sbatch options that the submission itself sets: overriding them would break it.
_RESERVED = {"array": "--workers", "output": "--slurm-folder", "error": "--slurm-folder"}
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_UNITS = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
# SLURM's own time formats: MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_CLOCK = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


@dataclass(frozen=True)
class Submission:
    """How ``search --executor`` submits its workers.

    Attributes:
        executor: ``slurm`` or ``local``.
        workers: How many worker tasks (array tasks, or local processes).
        folder: submitit's folder for pickles and logs (``%A`` becomes the job id).
        wait: Follow the study until it completes instead of returning once submitted.
        partition: The SLURM partition; default the cluster's.
        time_s: Each task's time limit; default the partition's.
        gpus_per_worker: GPUs each task asks for (``--gpus-per-node``).
        options: More sbatch options, long names without the dashes.
        requeue: Put a task that reaches its time limit back in the queue.
    """

    executor: str
    workers: int = 1
    folder: str = DEFAULT_FOLDER
    wait: bool = False
    partition: str | None = None
    time_s: int | None = None
    gpus_per_worker: int | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    requeue: bool = False


def submission(
    *,
    executor: str | None,
    workers: int | None,
    wait: bool,
    slurm_partition: str | None,
    slurm_time: str | None,
    slurm_gpus_per_worker: int | None,
    slurm_options: Sequence[str],
    slurm_requeue: bool,
    slurm_folder: str | None,
    gpus: str | None,
) -> Submission | None:
    """The submission that the options of ``search`` ask for; None without ``--executor``.

    Raises:
        UserError: Naming the option and the fix, for options that need ``--executor``,
            ``--gpus`` with ``--executor``, SLURM-only options with ``local``, a bad
            ``--slurm-time`` or ``--slurm-option``, or no ``sbatch`` for ``slurm``.
    """
    given = {
        "--workers": workers,
        "--wait": wait,
        "--slurm-partition": slurm_partition,
        "--slurm-time": slurm_time,
        "--slurm-gpus-per-worker": slurm_gpus_per_worker,
        "--slurm-option": slurm_options,
        "--slurm-requeue": slurm_requeue,
        "--slurm-folder": slurm_folder,
    }
    given = [name for name, value in given.items() if value not in (None, False, ())]
    if executor is None:
        if given:
            raise UserError(
                f"{given[0]} needs --executor slurm (or local), e.g. --executor slurm --workers 8"
            )
        return None
    if gpus is not None:
        raise UserError(
            "--gpus does not go with --executor: --gpus starts one worker per GPU on this "
            "machine; with --executor, ask each worker for its GPU with "
            "--slurm-gpus-per-worker 1"
        )
    if executor == "local":
        for name in ("--slurm-partition", "--slurm-option"):
            if name in given:
                raise UserError(f"{name} is for --executor slurm; drop it for local workers")
    sub = Submission(
        executor=executor,
        workers=workers or 1,
        folder=slurm_folder or DEFAULT_FOLDER,
        wait=wait,
        partition=slurm_partition,
        time_s=None if slurm_time is None else parse_slurm_time(slurm_time),
        gpus_per_worker=slurm_gpus_per_worker,
        options=parse_slurm_options(slurm_options),
        requeue=slurm_requeue,
    )
    if executor == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise UserError(
            "--executor slurm needs SLURM's sbatch and srun on PATH; run on a login node of "
            "the cluster (or load its slurm module), or use --executor local"
        )
    return sub


def parse_slurm_time(text: str) -> int:
    """Seconds from ``30m``, ``4h``, ``1d12h``, or SLURM's ``04:00:00`` and ``1-12:00:00``.

    Raises:
        UserError: For anything else, a bare number included (SLURM reads minutes where
            ``--timeout`` reads seconds, so it needs a unit).
    """
    value = text.strip().lower()
    units = _UNITS.fullmatch(value)
    clock = _CLOCK.fullmatch(value)
    seconds = 0
    if value and units and any(units.groups()):
        d, h, m, s = (int(g or 0) for g in units.groups())
        seconds = ((d * 24 + h) * 60 + m) * 60 + s
    elif clock and (":" in value or "-" in value):
        days, first, second, third = clock.groups()
        if days is None and third is None:
            h, m, s = 0, int(first), int(second)  # MM:SS
        else:
            h, m, s = int(first), int(second or 0), int(third or 0)
        seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
    if seconds <= 0:
        raise UserError(
            f"--slurm-time '{text}' is not a duration; use e.g. 30m, 4h or 1d12h, or SLURM's "
            f"04:00:00 or 1-12:00:00 (a bare number needs a unit)"
        )
    return seconds


def parse_slurm_options(pairs: Sequence[str]) -> dict[str, str]:
    """sbatch options from ``--slurm-option KEY=VALUE`` (e.g. ``account=lab``, ``mem=32G``).

    Raises:
        UserError: For a pair that is not KEY=VALUE, or an option the submission sets itself.
    """
    options = {}
    for pair in pairs:
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not _KEY.fullmatch(key) or not value:
            raise UserError(
                f"--slurm-option '{pair}' must look like KEY=VALUE with a long sbatch option "
                f"as KEY, e.g. --slurm-option account=lab --slurm-option mem=32G"
            )
        key = key.replace("_", "-")
        if key in _RESERVED:
            raise UserError(
                f"--slurm-option {key}=... is set by the submission itself; use "
                f"{_RESERVED[key]} instead"
            )
        options[key] = value
    return options
