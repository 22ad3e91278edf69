"""Scoring a saved model on a dataset split with the dataset's protocol."""

from __future__ import annotations

import dataclasses

from mapnet_tune import engine
from mapnet_tune.data import prepare
from mapnet_tune.errors import UserError
from mapnet_tune.metrics import format_header, format_row, legacy_lung_columns
from mapnet_tune.predict import load_predictor


def evaluate_model(
    ref: str,
    dataset: str,
    source: str | None,
    split: str,
    protocol: str | None,
    stride: int | None,
    device: str | None,
    tracking_uri: str | None = None,
) -> str:
    """Evaluate a checkpoint file or a registered model and return the printable result.

    The dataset is prepared with the options recorded with the model, so the model sees the
    preprocessing and resolution it was trained with. Protocol, stride and window default to
    the recorded ones, so a registered model reproduces the numbers logged when it was
    registered. A lung model trained on target ``bcdu-outside`` gets a second, labelled row:
    the published lung evaluation (``legacy_lung_*``), which leaks ground truth.

    Args:
        ref: A checkpoint path or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        dataset: The dataset to score on; must be the one the model was trained on.
        source: Dataset folder (default: the prepared one).
        split: ``train``, ``val`` or ``test``.
        protocol: ``full-image`` or ``sliding-window``; default the recorded one.
        stride: Sliding-window stride; default the recorded one (the published DRIVE
            numbers use 5).
        device: torch device; default CUDA when present.
        tracking_uri: The MLflow store for registry URIs.

    Raises:
        UserError: Unknown model or split, a model trained on another dataset, or bad data.
    """
    predictor, label = load_predictor(ref, tracking_uri, device)
    card = predictor.card
    if card.dataset != dataset:
        raise UserError(
            f"{label} was trained on '{card.dataset}', not '{dataset}'; "
            f"pass --dataset {card.dataset}"
        )
    data = prepare(dataset, source, card.dataset_options)
    if split not in data.splits:
        raise UserError(
            f"dataset '{dataset}' has no '{split}' split here (it has "
            f"{', '.join(data.splits)}); pass --split with one of those"
        )
    evaluation = dataclasses.replace(
        card.evaluation,
        protocol=protocol or card.evaluation.protocol,
        stride=stride or card.evaluation.stride,
    )
    metrics = engine.evaluate(
        predictor.model,
        data.splits[split],
        evaluation,
        split,
        device=predictor.device,
        legacy=True,
    )
    lines = [
        f"{label} on {dataset} {split}: {len(data.splits[split].images)} images, "
        f"{evaluation.describe()}, dataset fingerprint {data.fingerprint}"
    ]
    if card.fingerprint != data.fingerprint:
        lines.append(
            f"note: the model was trained and scored on dataset fingerprint "
            f"{card.fingerprint}; these files or options differ"
        )
    legacy_lung = legacy_lung_columns(metrics)
    if not legacy_lung:
        return "\n".join([*lines, format_header(), format_row(metrics, split)])
    # An around-lung (bcdu-outside) model: its own target first, then the published lung
    # evaluation, labelled, since only the latter compares with the published lung table.
    return "\n".join(
        [
            *lines,
            format_header(),
            "target (FOV and not lung), scored directly:",
            format_row(metrics, split),
            "legacy lung evaluation (published: estimated lung = FOV and not the prediction, "
            "against the lung mask); leaks ground truth through the FOV:",
            format_row(legacy_lung, split),
        ]
    )
