"""The ``mapnet-tune`` command line. Each command parses options and calls one function."""

from __future__ import annotations

import re
from pathlib import Path

import click

from mapnet_tune.errors import UserError


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit status 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished trials are kept; run the same command to resume",
                       err=True)
            ctx.exit(130)


def _duration(value: str | None) -> float | None:
    """Seconds from '90', '90s', '30m', '2h' or '1h30m'."""
    if value is None:
        return None
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                         r"(?:(\d+(?:\.\d+)?)s?)?\s*", value)
    if not value.strip() or parts is None:
        raise UserError(f"--timeout '{value}' is not a duration; use e.g. 600, 30m, 2h or 1h30m")
    h, m, s = (float(p) if p else 0.0 for p in parts.groups())
    return h * 3600 + m * 60 + s


@click.group(cls=_Group)
@click.version_option(package_name="mapnet-tune")
def main() -> None:
    """Hyperparameter search and experiment tracking for MAP-Net segmentation."""


@main.command()
@click.option("--dataset", required=True, help="drive, isic, lung, synthetic or folder.")
@click.option("--source", type=click.Path(), help="The dataset folder in its official layout.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A preprocessing option, e.g. input_mode=rgb (repeatable).")
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
@click.option("--dataset", help="Dataset whose shipped study file to use (studies/NAME.yaml).")
@click.option("--config", "config_path", type=click.Path(), help="A study file.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Total finished trials the study should reach, across all workers.")
@click.option("--study", "study_name", help="Study name (default from the dataset and file).")
@click.option("--storage", help="Optuna storage URL [env MAPNET_TUNE_STORAGE; "
                                "default sqlite:///optuna.db].")
@click.option("--tracking-uri", help="MLflow tracking URI [env MLFLOW_TRACKING_URI; "
                                     "default sqlite:///mlflow.db].")
@click.option("--timeout", help="Stop starting trials after this long, e.g. 30m or 2h.")
@click.option("--enqueue", type=click.Path(path_type=Path),
              help="YAML from export-best: try these parameters first.")
@click.option("--source", type=click.Path(), help="Dataset folder (default: the prepared one).")
@click.option("--device", help="torch device, e.g. cuda:1 or cpu (default: cuda if present).")
@click.option("--gpus", help="GPU indices, e.g. 0,1,2,3: one worker process per GPU slot, "
                             "pinned with CUDA_VISIBLE_DEVICES (needs PostgreSQL and an MLflow "
                             "server).")
@click.option("--trials-per-gpu", type=click.IntRange(min=1),
              help="Worker processes per GPU with --gpus [default: 1].")
@click.option("--heartbeat-interval", type=click.IntRange(min=1), default=30, show_default=True,
              envvar="MAPNET_TUNE_HEARTBEAT_S", metavar="SECONDS",
              help="How often a running trial tells the storage it is alive "
                   "[env MAPNET_TUNE_HEARTBEAT_S].")
@click.option("--grace-period", type=click.IntRange(min=2), default=90, show_default=True,
              envvar="MAPNET_TUNE_GRACE_S", metavar="SECONDS",
              help="Silence after which a running trial counts as lost, is failed and re-queued "
                   "[env MAPNET_TUNE_GRACE_S].")
def search(dataset: str | None, config_path: str | None, trials: int, study_name: str | None,
           storage: str | None, tracking_uri: str | None, timeout: str | None,
           enqueue: Path | None, source: str | None, device: str | None, gpus: str | None,
           trials_per_gpu: int | None, heartbeat_interval: int, grace_period: int) -> None:
    """Run (or resume) an Optuna study whose trials train MAP-Net and log to MLflow.

    Any number of workers, on one machine or many, share a study through the same
    --storage and --tracking-uri; --trials is the total across all of them.
    """
    from mapnet_tune import search as s
    from mapnet_tune.config import default_study_file, load_study

    if not dataset and not config_path:
        raise UserError("search needs --dataset NAME or --config FILE")
    study_cfg = load_study(config_path or default_study_file(dataset))
    if dataset and dataset != study_cfg.dataset.name:
        raise UserError(f"--dataset {dataset} does not match dataset.name "
                        f"'{study_cfg.dataset.name}' in {study_cfg.path}; drop one of them")
    req = s.SearchRequest(study=study_cfg, study_name=study_name or s.default_study_name(study_cfg),
                          storage=s.resolve_storage(storage), tracking_uri=tracking_uri,
                          trials=trials, timeout_s=_duration(timeout), enqueue=enqueue,
                          source=source, device=device, heartbeat_s=heartbeat_interval,
                          grace_s=grace_period)
    if trials_per_gpu is not None and gpus is None:
        raise UserError("--trials-per-gpu needs --gpus, e.g. --gpus 0,1 --trials-per-gpu 2")
    if gpus is not None:
        from mapnet_tune.workers import parse_gpus, run_workers

        study = run_workers(req, parse_gpus(gpus), trials_per_gpu or 1)
    else:
        study = s.run_search(req)
    click.echo(s.trials_table(study))
    from mapnet_tune.tracking import Tracker

    click.echo(f"\nBrowse the runs: {Tracker(tracking_uri).ui_command()}")


@main.command()
@click.option("--study", "study_name", help="Study name (default: the storage's only study).")
@click.option("--storage", help="Optuna storage URL [env MAPNET_TUNE_STORAGE].")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--tracking-uri", help="MLflow store of the registry [env MLFLOW_TRACKING_URI].")
def status(study_name: str | None, storage: str | None, top: int,
           tracking_uri: str | None) -> None:
    """Print the best trials of a study and the registered versions of its model."""
    from mapnet_tune import search as s
    from mapnet_tune.report import registered_summary

    study = s.load_existing_study(storage, study_name)
    click.echo(s.trials_table(study, top))
    registered = registered_summary(study.user_attrs.get("dataset", ""), tracking_uri)
    if registered:
        click.echo(f"\n{registered}")


@main.command("export-best")
@click.option("--study", "study_name", help="Study name (default: the storage's only study).")
@click.option("--storage", help="Optuna storage URL [env MAPNET_TUNE_STORAGE].")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write here instead of stdout.")
def export_best(study_name: str | None, storage: str | None, top: int, out: Path | None) -> None:
    """Write the best parameters as YAML (search --enqueue reads it back)."""
    from mapnet_tune import search as s

    text = s.export_best(s.load_existing_study(storage, study_name), top)
    if out:
        out.write_text(text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--tracking-uri", help="MLflow store [env MLFLOW_TRACKING_URI].")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5000, show_default=True)
def ui(tracking_uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI on the configured store."""
    from mapnet_tune.tracking import Tracker

    tracker = Tracker(tracking_uri)
    click.echo(f"MLflow UI for {tracker.uri} at http://{host}:{port} (Ctrl-C stops it)")
    tracker.serve_ui(host, port)


@main.command()
@click.option("--checkpoint", type=click.Path(), help="A mapnet-tune .pt file.")
@click.option("--model", "model_uri", metavar="URI",
              help="A registered model: models:/mapnet-drive@champion or models:/NAME/VERSION.")
@click.option("--dataset", required=True)
@click.option("--source", type=click.Path(), help="Dataset folder (default: the prepared one).")
@click.option("--split", default="test", show_default=True)
@click.option("--protocol", type=click.Choice(["full-image", "sliding-window"]),
              help="Default: the one the model was trained for.")
@click.option("--stride", type=click.IntRange(min=1),
              help="Sliding-window stride [default: the model's, else 5 as published].")
@click.option("--tracking-uri", help="MLflow store of --model [env MLFLOW_TRACKING_URI].")
@click.option("--device", help="torch device (default: cuda if present).")
def evaluate(checkpoint: str | None, model_uri: str | None, dataset: str, source: str | None,
             split: str, protocol: str | None, stride: int | None, tracking_uri: str | None,
             device: str | None) -> None:
    """Score a model on a dataset split; one row in the published tables' order."""
    from mapnet_tune.evaluation import evaluate_model

    if (checkpoint is None) == (model_uri is None):
        raise UserError("evaluate needs exactly one of --checkpoint FILE and --model URI")
    click.echo(evaluate_model(checkpoint or model_uri, dataset, source, split, protocol, stride,
                              device, tracking_uri))


@main.command("retrain-best")
@click.option("--study", "study_name", help="Study name (default: the storage's only study).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best finished trials to retrain.")
@click.option("--folds", type=click.IntRange(min=0),
              help="K-fold cross-validation over train+val decides, and the best mean is "
                   "registered; 0 decides on the val split [default: the study file's "
                   "retrain.folds].")
@click.option("--recipe", "recipes", metavar="NAME[,NAME...]",
              help="Retrain recipes that compete under the same validation, e.g. "
                   "default,crop256 [default: default].")
@click.option("--force", is_flag=True, help="Retrain trials that are registered already.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="The study file (default: the one the search ran with).")
@click.option("--storage", help="Optuna storage URL [env MAPNET_TUNE_STORAGE].")
@click.option("--tracking-uri", help="MLflow tracking URI [env MLFLOW_TRACKING_URI].")
@click.option("--source", type=click.Path(), help="Dataset folder (default: the prepared one).")
@click.option("--device", help="torch device (default: cuda if present).")
def retrain_best(study_name: str | None, top_k: int, folds: int | None, recipes: str | None,
                 force: bool, config_path: Path | None, storage: str | None,
                 tracking_uri: str | None, source: str | None, device: str | None) -> None:
    """Validate the best trials' retrain recipe, register the chosen models, score test once."""
    from mapnet_tune.retrain import RetrainRequest
    from mapnet_tune.retrain import retrain_best as run

    click.echo(run(RetrainRequest(study_name=study_name, storage=storage,
                                  tracking_uri=tracking_uri, top_k=top_k, folds=folds,
                                  recipes=_names(recipes, "--recipe"), force=force,
                                  config=config_path, source=source, device=device)))


@main.command()
@click.option("--model", "model_uri", required=True, metavar="URI",
              help="models:/mapnet-drive@champion, models:/NAME/VERSION or a .pt file.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for NAME_prob.png and NAME_mask.png per image.")
@click.option("--tta", is_flag=True, help="Average over flips (test-time augmentation).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--tracking-uri", help="MLflow store of --model [env MLFLOW_TRACKING_URI].")
@click.option("--device", help="torch device (default: cuda if present).")
def predict(model_uri: str, images: tuple[str, ...], out: Path, tta: bool, batch_size: int,
            tracking_uri: str | None, device: str | None) -> None:
    """Write probability maps and binary masks for images of any size."""
    from mapnet_tune.predict import predict_files

    click.echo(predict_files(model_uri, images, out, tta=tta, batch_size=batch_size,
                             tracking_uri=tracking_uri, device=device))


@main.command()
@click.option("--study", "study_name", help="Study name (default: the storage's only study).")
@click.option("--out", type=click.Path(path_type=Path), help="Folder [default: reports/STUDY].")
@click.option("--storage", help="Optuna storage URL [env MAPNET_TUNE_STORAGE].")
@click.option("--tracking-uri", help="MLflow tracking URI [env MLFLOW_TRACKING_URI].")
def report(study_name: str | None, out: Path | None, storage: str | None,
           tracking_uri: str | None) -> None:
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
