"""The ``mapnet-tune`` command line. Each command parses options and calls one function."""

from __future__ import annotations

import re
from pathlib import Path

import click

from mapnet_tune.data import DATASETS
from mapnet_tune.errors import UserError
from mapnet_tune.settings import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, STORAGE_ENV, TRACKING_ENV

# Options several commands share, declared once. Their environment defaults are resolved in
# mapnet_tune.settings, so library callers get the same defaults as the command line.
STORAGE = click.option(
    "--storage", help=f"Optuna storage URL [env {STORAGE_ENV}; default {DEFAULT_STORAGE}]."
)
TRACKING_URI = click.option(
    "--tracking-uri",
    help=f"MLflow tracking URI [env {TRACKING_ENV}; default {DEFAULT_TRACKING_URI}].",
)
DEVICE = click.option("--device", help="torch device (default: cuda if present).")
SOURCE = click.option(
    "--source",
    type=click.Path(),
    help="Dataset folder in its official layout (default: the one prepared before).",
)
STUDY = click.option(
    "--study", "study_name", help="Study name (default: the storage's only study)."
)
HOST = click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
DATASET_NAMES = ", ".join(DATASETS)


def _datasets_epilog() -> str:
    """Every dataset with its one-line summary and its options, for ``prepare --help``."""
    blocks = []
    for loader in DATASETS.values():
        options = "; ".join(
            f"{name}={opt.default!r}: {opt.help}" for name, opt in loader.options.items()
        )
        blocks.append(f"{loader.name}: {loader.summary}. Options: {options}.")
    return "Datasets (pass options as --option KEY=VALUE):\n\n" + "\n\n".join(blocks)


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit status 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished trials are kept; run the same command to resume", err=True
            )
            ctx.exit(130)


def _duration(value: str | None) -> float | None:
    """Seconds from '90', '90s', '30m', '2h' or '1h30m'."""
    if value is None:
        return None
    parts = re.fullmatch(
        r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
        r"(?:(\d+(?:\.\d+)?)s?)?\s*",
        value,
    )
    if not value.strip() or parts is None:
        raise UserError(f"--timeout '{value}' is not a duration; use e.g. 600, 30m, 2h or 1h30m")
    h, m, s = (float(p) if p else 0.0 for p in parts.groups())
    return h * 3600 + m * 60 + s


@click.group(cls=_Group)
@click.version_option(package_name="mapnet-tune")
def main() -> None:
    """Hyperparameter search and experiment tracking for MAP-Net segmentation."""


@main.command(epilog=_datasets_epilog())
@click.option("--dataset", required=True, help=f"One of {DATASET_NAMES}.")
@SOURCE
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A preprocessing option, e.g. input_mode=rgb (repeatable).",
)
def prepare(dataset: str, source: str | None, options: tuple[str, ...]) -> None:
    """Validate, preprocess and cache a dataset; print its card."""
    from mapnet_tune.data import prepare as prepare_dataset
    from mapnet_tune.data import remember_source

    parsed = _options(options)
    data = prepare_dataset(dataset, source, parsed)
    if source:
        remember_source(dataset, source)
    click.echo(data.card())


def _options(pairs: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--option '{pair}' must look like KEY=VALUE, e.g. input_mode=rgb")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@main.command()
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
@click.option(
    "--grace-period",
    type=click.IntRange(min=2),
    default=90,
    show_default=True,
    envvar="MAPNET_TUNE_GRACE_S",
    metavar="SECONDS",
    help="Silence after which a running trial counts as lost, is failed and re-queued "
    "[env MAPNET_TUNE_GRACE_S].",
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
    req = search_request(timeout_s=_duration(timeout), **opts)
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
    click.echo(trials_table(study))
    from mapnet_tune.tracking import Tracker

    click.echo("\n" + Tracker(req.tracking_uri).browse(req.study_name))


@main.command()
@STUDY
@STORAGE
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@TRACKING_URI
def status(study_name: str | None, storage: str | None, top: int, tracking_uri: str | None) -> None:
    """Print the best trials of a study and the registered versions of its model."""
    from mapnet_tune.report import registered_summary
    from mapnet_tune.storage import load_existing_study
    from mapnet_tune.study.summary import trials_table

    study = load_existing_study(storage, study_name)
    click.echo(trials_table(study, top))
    registered = registered_summary(study.user_attrs.get("dataset", ""), tracking_uri)
    if registered:
        click.echo(f"\n{registered}")


@main.command("export-best")
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


@main.command()
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


@main.command()
@STORAGE
@HOST
@click.option("--port", type=int, default=8080, show_default=True)
def dashboard(storage: str | None, host: str, port: int) -> None:
    """Start optuna-dashboard on the study storage: every study's live plots."""
    from mapnet_tune.dashboard import serve

    serve(storage, host, port)


@main.command()
@click.option("--checkpoint", type=click.Path(), help="A mapnet-tune .pt file.")
@click.option(
    "--model",
    "model_uri",
    metavar="URI",
    help="A registered model: models:/mapnet-drive@champion or models:/NAME/VERSION.",
)
@click.option("--dataset", required=True, help=f"One of {DATASET_NAMES}.")
@SOURCE
@click.option("--split", default="test", show_default=True)
@click.option(
    "--protocol",
    type=click.Choice(["full-image", "sliding-window"]),
    help="Default: the one the model was trained for.",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    help="Sliding-window stride [default: the model's; the published DRIVE numbers use 5].",
)
@TRACKING_URI
@DEVICE
def evaluate(
    checkpoint: str | None,
    model_uri: str | None,
    dataset: str,
    source: str | None,
    split: str,
    protocol: str | None,
    stride: int | None,
    tracking_uri: str | None,
    device: str | None,
) -> None:
    """Score a model on a dataset split; one row in the published tables' order."""
    from mapnet_tune.evaluation import evaluate_model

    if (checkpoint is None) == (model_uri is None):
        raise UserError("evaluate needs exactly one of --checkpoint FILE and --model URI")
    click.echo(
        evaluate_model(
            checkpoint or model_uri, dataset, source, split, protocol, stride, device, tracking_uri
        )
    )


@main.command("retrain-best")
@STUDY
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="How many of the best finished trials to retrain.",
)
@click.option(
    "--folds",
    type=click.IntRange(min=0),
    help="K-fold cross-validation over train+val decides, and the best mean is "
    "registered; 0 decides on the val split [default: the study file's "
    "retrain.folds].",
)
@click.option(
    "--recipe",
    "recipes",
    metavar="NAME[,NAME...]",
    help="Retrain recipes that compete under the same validation, e.g. "
    "default,crop256 [default: default].",
)
@click.option("--force", is_flag=True, help="Retrain trials that are registered already.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="The study file (default: the one the search ran with).",
)
@STORAGE
@TRACKING_URI
@SOURCE
@DEVICE
def retrain_best(recipes: str | None, config_path: Path | None, **opts) -> None:
    """Validate the best trials' retrain recipe, register the chosen models, score test once."""
    from mapnet_tune.retrain import RetrainRequest
    from mapnet_tune.retrain import retrain_best as run

    request = RetrainRequest(recipes=_names(recipes, "--recipe"), config=config_path, **opts)
    click.echo(run(request))


@main.command()
@click.option(
    "--model",
    "model_uri",
    required=True,
    metavar="URI",
    help="models:/mapnet-drive@champion, models:/NAME/VERSION or a .pt file.",
)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for NAME_prob.png and NAME_mask.png per image.",
)
@click.option("--tta", is_flag=True, help="Average over flips (test-time augmentation).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@TRACKING_URI
@DEVICE
def predict(model_uri: str, images: tuple[str, ...], out: Path, **opts) -> None:
    """Write probability maps and binary masks for images of any size."""
    from mapnet_tune.predict import predict_files

    click.echo(predict_files(model_uri, images, out, **opts))


@main.command()
@STUDY
@click.option("--out", type=click.Path(path_type=Path), help="Folder [default: reports/STUDY].")
@STORAGE
@TRACKING_URI
def report(
    study_name: str | None, out: Path | None, storage: str | None, tracking_uri: str | None
) -> None:
    """The registered champion next to the published tables, with the study's plots."""
    from mapnet_tune.report import write_report

    click.echo(write_report(study_name, storage, tracking_uri, out))


def _names(text: str | None, option: str) -> tuple[str, ...] | None:
    """A comma-separated option as a tuple of names; None when not given."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"{option} needs at least one name, e.g. {option} default")
    return names


if __name__ == "__main__":
    main()
