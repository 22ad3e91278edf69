"""The model stage: ``retrain-best``, ``evaluate``, ``predict`` and ``report``."""

from __future__ import annotations

from pathlib import Path

import click

from mapnet_tune.cli.options import (
    DATASET_NAMES,
    DEVICE,
    SOURCE,
    STORAGE,
    STUDY,
    TRACKING_URI,
    names,
)
from mapnet_tune.errors import UserError


@click.command()
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


@click.command("retrain-best")
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
@click.option(
    "--gate",
    type=click.Choice(["rerun", "refuse"]),
    default="rerun",
    show_default=True,
    help="When the champion was selected on another basis (study, folds, data, mode): "
    "re-run its candidate on the current folds to compare, or refuse to move the alias.",
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

    request = RetrainRequest(recipes=names(recipes, "--recipe"), config=config_path, **opts)
    click.echo(run(request))


@click.command()
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
    help="Folder for NAME_prob.png (or .tif) and NAME_mask.png per image.",
)
@click.option("--tta", is_flag=True, help="Average over flips (test-time augmentation).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--prob-format",
    type=click.Choice(["png", "tiff"]),
    default="png",
    show_default=True,
    help="Probability maps as 8-bit PNG (x 255) or float32 TIFF (exact).",
)
@TRACKING_URI
@DEVICE
def predict(model_uri: str, images: tuple[str, ...], out: Path, **opts) -> None:
    """Write probability maps and binary masks for images of any size."""
    from mapnet_tune.predict import predict_files

    click.echo(predict_files(model_uri, images, out, **opts))


@click.command()
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
