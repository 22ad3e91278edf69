"""report: the registered models next to the published tables, and the study's plots.

The published rows ship as data (``mapnet_tune/published/<dataset>.yaml``) with their
caveats: the tables' "JS" is pixel accuracy, the lung and ISIC "AUC" is thresholded, and the
lung evaluation leaks ground truth. The report prints its numbers in the published columns
where those mean the same, and adds the correct ones (ROC-AUC, true IoU, per-image IoU).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib

# Plots are written to files; no display may be needed, on a server or in a test.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402

from mapnet_tune.errors import UserError  # noqa: E402
from mapnet_tune.metrics import legacy_lung_columns  # noqa: E402
from mapnet_tune.modelcard import tagged_metrics  # noqa: E402
from mapnet_tune.names import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    GIT_TAG,
    MODEL_FORMAT_TAG,
    REPORT_SOURCE,
    ROC_ARTIFACT,
    ROLE_TAG,
    SERVABLE_FORMAT,
    STUDY_TAG,
    model_name,
)
from mapnet_tune.plots import STUDY_PLOTS, study_plots  # noqa: E402
from mapnet_tune.storage import load_existing_study, ranked_trials  # noqa: E402
from mapnet_tune.study.summary import trials_table  # noqa: E402
from mapnet_tune.tracking import (  # noqa: E402
    ModelVersionInfo,
    Tracker,
    git_sha,
    store_exists,
)

#: Columns for datasets without published results.
DEFAULT_COLUMNS = (
    {"header": "F1", "key": "f1"},
    {"header": "Sens", "key": "sensitivity"},
    {"header": "Spec", "key": "specificity"},
    {"header": "Acc", "key": "accuracy"},
)


@dataclass(frozen=True)
class Published:
    """The published table of one dataset.

    Attributes:
        dataset: Dataset name.
        title: What the table scores.
        columns: ``{"header", "key"}`` pairs: the published header and this project's metric
            with the same meaning.
        rows: One mapping per method: ``method``, a value per header and optionally ``iou``
            (derived as F1 / (2 - F1)).
        caveats: What a reader must know before comparing.
    """

    dataset: str
    title: str
    columns: tuple[dict[str, str], ...]
    rows: tuple[dict[str, Any], ...]
    caveats: tuple[str, ...]


def published(dataset: str) -> Published | None:
    """The shipped published table for ``dataset``, or None when there is none."""
    entry = resources.files("mapnet_tune") / "published" / f"{dataset}.yaml"
    if not entry.is_file():
        return None
    doc = yaml.safe_load(entry.read_text())
    return Published(
        dataset=doc["dataset"],
        title=doc["title"],
        columns=tuple(doc["columns"]),
        rows=tuple(doc["rows"]),
        caveats=tuple(doc.get("caveats", ())),
    )


def comparison_table(
    table: Published | None, ours: Sequence[tuple[str, Mapping[str, float]]], split: str
) -> str:
    """A Markdown table: the published rows, then ours, in the published columns plus the
    correct ones (ROC-AUC where the published AUC is not it, true IoU, per-image IoU).

    Args:
        table: The published table, or None for a dataset without one.
        ours: (label, metrics keyed ``split/name``) per registered model.
        split: The split our metrics are on (``test``, or ``val`` without a test split).

    Returns:
        The table; published IoU values are derived and marked ``*``.
    """
    columns = list(table.columns if table else DEFAULT_COLUMNS)
    if not any(c["key"] == "auc" for c in columns):
        columns.append({"header": "ROC-AUC", "key": "auc"})
    columns += [{"header": "IoU", "key": "iou"}, {"header": "IoU/img", "key": "iou_per_image"}]
    head = ["method", *(c["header"] for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for row in table.rows if table else ():
        cells = [_cell(row.get(c["header"])) for c in columns]
        if "iou" in row:
            cells[[c["key"] for c in columns].index("iou")] = f"{row['iou']:.4f}*"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    for label, metrics in ours:
        cells = [_cell(metrics.get(f"{split}/{c['key']}")) for c in columns]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def write_report(
    study_name: str | None, storage: str | None, tracking_uri: str | None, out: str | Path | None
) -> str:
    """Write ``report.md`` and the plots for a study, log them to MLflow, return the text.

    Args:
        study_name: The study; default the storage's only one.
        storage: Optuna storage URL.
        tracking_uri: MLflow store holding the registry.
        out: Output folder; default ``reports/<study>``.

    Raises:
        UserError: An unknown study, or one without a completed trial.
    """
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    study = load_existing_study(storage, study_name)
    if not ranked_trials(study):
        raise UserError(
            f"study '{study.study_name}' has no completed trial to report; run "
            f"`mapnet-tune search --study {study.study_name}` until one completes"
        )
    dataset = study.user_attrs.get("dataset", "unknown")
    folder = Path(out) if out is not None else Path("reports") / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    models = _registered(tracker, model_name(dataset))
    notes: list[str] = []
    plots = study_plots(study, folder, STUDY_PLOTS, notes)
    champion = next((v for v in models if CHAMPION in v.aliases), None)
    if champion is not None and _roc_plot(tracker, champion, folder / "roc.png", notes):
        plots.append("roc.png")
    text = _markdown(study, dataset, models, plots, notes)
    (folder / "report.md").write_text(text)
    _log(tracker, study, [folder / "report.md", *(folder / p for p in plots)])
    return text + f"\n\nwrote {folder / 'report.md'} and {len(plots)} plot(s) to {folder}"


def registered_summary(dataset: str, tracking_uri: str | None) -> str:
    """Every registered version of a dataset's model: aliases, how it was chosen, its test.

    Empty when there is no tracking store here yet or nothing is registered.
    """
    if not store_exists(tracking_uri):
        return ""
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    versions = tracker.versions(model_name(dataset))
    if not versions:
        return ""
    lines = [f"registered {model_name(dataset)} (decided on validation; test scored once):"]
    for v in versions:
        metrics = tagged_metrics(v.tags)
        chosen = v.tags.get("selection_metric", "?")
        test = {k: x for k, x in metrics.items() if k.startswith("test/") and k.count("/") == 1}
        shown = f"test/iou {test['test/iou']:.4f}" if "test/iou" in test else "no test"
        servable = (
            ""
            if v.tags.get(MODEL_FORMAT_TAG) == SERVABLE_FORMAT
            else "; not servable (registered before servable models: predict, evaluate and "
            "report read its checkpoint; `retrain-best --force` registers a servable one)"
        )
        lines.append(
            f"  {v.label}: trial {v.tags.get('trial', '?')}, recipe {v.tags.get('recipe', '?')}, "
            f"{chosen} {metrics.get(chosen, math.nan):.4f}, {shown}{servable}"
        )
    champion = next((v for v in versions if CHAMPION in v.aliases), None)
    if champion is not None and champion.tags.get(MODEL_FORMAT_TAG) == SERVABLE_FORMAT:
        lines += ["", *tracker.serve_commands(f"models:/{champion.name}@{CHAMPION}")]
    return "\n".join(lines)


def _registered(tracker: Tracker, name: str) -> list[ModelVersionInfo]:
    """The champion, and the challenger when it is another version."""
    found = [tracker.version_by_alias(name, alias) for alias in (CHAMPION, CHALLENGER)]
    unique = {v.version: v for v in found if v is not None}
    return list(unique.values())


def _roc_plot(tracker: Tracker, champion: ModelVersionInfo, path: Path, notes: list[str]) -> bool:
    """The champion's ROC curve from the points logged when it was scored."""
    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.download(champion.run_id, ROC_ARTIFACT, tmp)
        if local is None:
            notes.append(
                f"no ROC curve: {champion.label} has no test predictions logged "
                f"(the dataset has no test split, or another tool registered it)"
            )
            return False
        roc = json.loads(local.read_text())
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot(
        roc["fpr"], roc["tpr"], label=f"{champion.name} v{champion.version} (AUC {roc['auc']:.4f})"
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"ROC, {roc['split']} split",
    )
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return True


def _markdown(
    study: optuna.Study,
    dataset: str,
    models: list[ModelVersionInfo],
    plots: list[str],
    notes: list[str],
) -> str:
    table = published(dataset)
    lines = [f"# mapnet-tune report: study {study.study_name}", ""]
    if not models:
        lines += [
            f"No registered model mapnet-{dataset} yet: run `mapnet-tune retrain-best "
            f"--study {study.study_name}`.",
            "",
        ]
    split = "test" if all(v.tags.get("test_scored") == "yes" for v in models) else "val"
    title = table.title if table else f"{dataset} (no published results ship for it)"
    lines += [f"## Registered models and published results: {title}", ""]
    ours = [_row_metrics(v, dataset, split) for v in models]
    lines += [comparison_table(table, ours, split), ""]
    if split == "val":
        lines += [
            "Our rows are validation numbers (cross-validated means where the model was "
            "chosen by cross-validation): the dataset had no test split, so they are not "
            "comparable with published test numbers.",
            "",
        ]
    lines += [f"- {c}" for c in (table.caveats if table else ())]
    lines += ["", "## Best trials", "", trials_table(study, 5), "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _row_metrics(
    version: ModelVersionInfo, dataset: str, split: str
) -> tuple[str, dict[str, float]]:
    """(label, metrics keyed ``split/name``) of a registered version's row.

    Test rows are the single test score stored with the version. Validation rows use the
    val split's numbers, or the cross-validated means for a model chosen by folds.

    A lung model trained on ``bcdu-outside`` predicts FOV and not lung, so its own metrics do
    not belong under the lung headers: its row shows the published evaluation of it instead
    (``legacy_lung_*``, estimated lung = FOV and not the prediction), labelled as leaking
    ground truth. Every other model shows its own (honest) metrics.
    """
    metrics = tagged_metrics(version.tags)
    for key, value in list(metrics.items()):
        if key.startswith("cv/") and key.endswith("_mean"):
            metrics.setdefault(key.removeprefix("cv/").removesuffix("_mean"), value)
    try:
        options = json.loads(version.tags.get("dataset.options") or "{}")
    except ValueError:
        options = {}
    # Options are recorded as given, and option values parse case-insensitively.
    target = str(options.get("target", "")).lower() if isinstance(options, dict) else ""
    if dataset != "lung" or target != "bcdu-outside":
        return _label(version), metrics
    return (
        f"{_label(version)}; legacy lung evaluation, leaks ground truth",
        legacy_lung_columns(metrics),
    )


def _label(version: ModelVersionInfo) -> str:
    tags = version.tags
    return (
        f"MAP-Net, mapnet-tune: {version.name} v{version.version} "
        f"@{', @'.join(version.aliases)} (study {tags.get('study', '?')}, trial "
        f"{tags.get('trial', '?')}, recipe {tags.get('recipe', '?')}; trained on "
        f"{tags.get('train_resolution', '?')}; test scored with {tags.get('evaluation', '?')}, "
        f"threshold {tags.get('threshold', '?')} ({tags.get('threshold.rule', 'fixed at 0.5')}); "
        f"chosen by {tags.get('selection_metric', '?')})"
    )


def _log(tracker: Tracker, study: optuna.Study, files: list[Path]) -> None:
    experiment = tracker.experiment(study.study_name)
    dataset = study.user_attrs.get("dataset", "unknown")
    run_id = tracker.create_run(
        experiment,
        f"{dataset}-report",
        {STUDY_TAG: study.study_name, ROLE_TAG: "report", GIT_TAG: git_sha()},
        source=REPORT_SOURCE,
    )
    for path in files:
        tracker.log_file(run_id, path, "report")
    tracker.end_run(run_id, "FINISHED")
