"""The search stage: ``search`` (run or resume a study), ``status`` and ``export-best``."""

from __future__ import annotations

from pathlib import Path

import click

from mapnet_tune.cli.options import (
    DATASET_NAMES,
    DEVICE,
    GRACE_PERIOD,
    SOURCE,
    STORAGE,
    STUDY,
    TRACKING_URI,
    duration,
)
from mapnet_tune.errors import UserError


@click.command()
@click.option("--dataset", help=f"Use the shipped study file of one of {DATASET_NAMES}.")
@click.option("--config", "config_path", type=click.Path(), help="A study file.")
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Total finished trials the study should reach, across all workers.",
)
@click.option("--study", "study_name", help="Study name (default from the dataset and file).")
@STORAGE
@TRACKING_URI
@click.option("--timeout", help="Stop starting trials after this long, e.g. 30m or 2h.")
@click.option(
    "--enqueue",
    type=click.Path(path_type=Path),
    help="YAML from export-best: try these parameters first.",
)
@SOURCE
@DEVICE
@click.option(
    "--gpus",
    help="GPU indices, e.g. 0,1,2,3: one worker process per GPU slot, "
    "pinned with CUDA_VISIBLE_DEVICES (needs PostgreSQL and an MLflow "
    "server).",
)
@click.option(
    "--trials-per-gpu",
    type=click.IntRange(min=1),
    help="Worker processes per GPU with --gpus [default: 1].",
)
@click.option(
    "--executor",
    type=click.Choice(["slurm", "local"]),
    help="Submit --workers workers through submitit: slurm as one job array, local as "
    "processes on this machine; returns once submitted (needs PostgreSQL or a journal "
    "file, and an MLflow server).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker tasks with --executor [default: 1].",
)
@click.option("--wait", is_flag=True, help="With --executor: follow the study until it completes.")
@click.option("--slurm-partition", metavar="NAME", help="SLURM partition [default: the cluster's].")
@click.option(
    "--slurm-time",
    metavar="DURATION",
    help="Time limit of each task, e.g. 4h or 1-00:00:00 [default: the partition's]; "
    "SIGUSR1 two minutes before it stops the task cleanly.",
)
@click.option(
    "--slurm-gpus-per-worker",
    type=click.IntRange(min=0),
    metavar="N",
    help="GPUs each task asks for (sbatch --gpus-per-node).",
)
@click.option(
    "--slurm-option",
    "slurm_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other sbatch option, e.g. account=lab, mem=32G, cpus-per-task=8 (repeatable).",
)
@click.option(
    "--slurm-requeue",
    is_flag=True,
    help="Put a task that reaches its time limit back in the queue (after its trial is "
    "queued again).",
)
@click.option(
    "--slurm-folder",
    type=click.Path(),
    help="Folder for the tasks' logs and pickles; %A is the job id "
    "[default: .mapnet-tune/slurm/%A].",
)
@click.option(
    "--heartbeat-interval",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    envvar="MAPNET_TUNE_HEARTBEAT_S",
    metavar="SECONDS",
    help="How often a running trial tells the storage it is alive [env MAPNET_TUNE_HEARTBEAT_S].",
)
@GRACE_PERIOD
@click.option(
    "--warm-start",
    metavar="OLD_STUDY",
    help="Copy OLD_STUDY's finished trials that lie inside this study's search space into "
    "the new study, so that the sampler starts from them (they do not count toward "
    "--trials).",
)
@click.option(
    "--warm-storage",
    metavar="URL",
    envvar="MAPNET_TUNE_WARM_STORAGE",
    help="Optuna storage of OLD_STUDY [env MAPNET_TUNE_WARM_STORAGE; default: --storage].",
)
def search(timeout: str | None, gpus: str | None, trials_per_gpu: int | None, **opts) -> None:
    """Run (or resume) an Optuna study whose trials train MAP-Net and log to MLflow.

    Any number of workers, on one machine or many, share a study through the same
    --storage and --tracking-uri; --trials is the total across all of them. --executor
    slurm submits them as one SLURM job array (see docs/deploy.md).
    """
    from mapnet_tune.study.request import search_request
    from mapnet_tune.study.submission import SUBMIT_OPTIONS, submission
    from mapnet_tune.study.summary import trials_table

    submit = submission(gpus=gpus, **{name: opts.pop(name) for name in SUBMIT_OPTIONS})
    req = search_request(timeout_s=duration(timeout), **opts)
    if trials_per_gpu is not None and gpus is None:
        raise UserError("--trials-per-gpu needs --gpus, e.g. --gpus 0,1 --trials-per-gpu 2")
    if submit is not None:
        from mapnet_tune.study.slurm import submit_search

        study = submit_search(req, submit)
        if study is None:
            return
    elif gpus is not None:
        from mapnet_tune.study.launcher import parse_gpus, run_workers

        study = run_workers(req, parse_gpus(gpus), trials_per_gpu or 1)
    else:
        from mapnet_tune.study.worker import run_search

        study = run_search(req)
    click.echo(trials_table(study, grace_s=req.grace_s))
    from mapnet_tune.tracking import Tracker

    click.echo("\n" + Tracker(req.tracking_uri).browse(req.study_name))


@click.command()
@STUDY
@STORAGE
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@TRACKING_URI
@GRACE_PERIOD
def status(
    study_name: str | None,
    storage: str | None,
    top: int,
    tracking_uri: str | None,
    grace_period: int,
) -> None:
    """Print the best trials of a study, its running and stale trials, and its model versions.

    A running trial whose heartbeat is older than --grace-period is shown as stale: its
    worker is gone, and the next worker on the study retries it.
    """
    from mapnet_tune.report import registered_summary
    from mapnet_tune.storage import load_existing_study
    from mapnet_tune.study.summary import trials_table

    study = load_existing_study(storage, study_name)
    click.echo(trials_table(study, top, grace_period))
    registered = registered_summary(study.user_attrs.get("dataset", ""), tracking_uri)
    if registered:
        click.echo(f"\n{registered}")


@click.command("export-best")
@STUDY
@STORAGE
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write here instead of stdout.")
def export_best(study_name: str | None, storage: str | None, top: int, out: Path | None) -> None:
    """Write the best parameters as YAML (search --enqueue reads it back)."""
    from mapnet_tune.storage import load_existing_study
    from mapnet_tune.study.summary import export_best as best_yaml

    text = best_yaml(load_existing_study(storage, study_name), top)
    if out:
        out.write_text(text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)
