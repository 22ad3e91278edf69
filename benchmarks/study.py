"""Study efficiency: a short real Optuna study, timed end to end, and a bf16-vs-fp32 check.

The study runs through ``mapnet_tune.study.worker.run_search`` exactly as ``mapnet-tune search``
does, from a shrunken copy of a study file (fewer epochs, capped steps, optionally a narrower
model and a coarser validation stride), in a working directory with the embedded stores:
Optuna on ``sqlite:///optuna.db`` and MLflow on ``sqlite:///mlflow.db`` with ``./mlruns``.
It reports the trials finished, the wall time, trials per hour, the best objective value,
the wall time until the objective first reached ``--target`` and the trials' mean training
samples/s. The working directory is kept with ``--workdir`` (so that ``mapnet-tune
retrain-best`` can run there afterwards), else it is a temporary folder.

``--precision-check`` instead trains one configuration twice with ``engine.fit``, once with
the engine's bf16 autocast and once in IEEE fp32 (TF32 off), and compares the validation
metric epoch by epoch: the accuracy side of the fast path.

Usage:
    python benchmarks/study.py [--smoke] [--config studies/drive.yaml] [--trials 4]
        [--epochs 2] [--steps-per-epoch 100] [--width 1.0] [--eval-stride 16] [--target 0.6]
        [--timeout 180] [--retrain-epochs 1] [--retrain-patches 40] [--workdir DIR]
        [--source DRIVE_ROOT] [--device cuda] [--append docs/benchmarks.md]
    python benchmarks/study.py --precision-check [--epochs 2] [--steps-per-epoch 100]
        [--batch-size 64] [--lr 1e-3] [...]

DRIVE is read from ``--source``, else ``$DRIVE_ROOT``, else ``../shared/data/drive`` beside
the repository.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from optuna.trial import FrozenTrial, TrialState
from throughput import Setting, cuda_backend_flags, report_header

from mapnet_tune import engine
from mapnet_tune.config import StudyConfig, load_study, read_yaml
from mapnet_tune.data import prepare
from mapnet_tune.recipe import build_model, search_settings
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.study.worker import run_search
from mapnet_tune.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DRIVE = REPO.parent / "shared" / "data" / "drive"
STORAGE = "sqlite:///optuna.db"
TRACKING_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class Shrink:
    """Overrides written over a study file; None keeps the file's value.

    Attributes:
        width: ``model.width``.
        epochs: ``train.epochs``.
        steps_per_epoch: ``train.steps_per_epoch``.
        eval_stride: ``train.eval_stride``.
        retrain_epochs: ``retrain.epochs``.
        retrain_patches: ``retrain.dataset_options.patches_per_image``.
    """

    width: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    eval_stride: int | None = None
    retrain_epochs: int | None = None
    retrain_patches: int | None = None


SMOKE = {"width": 0.125, "epochs": 2, "steps_per_epoch": 3, "eval_stride": 64, "trials": 2}
"""``--smoke``: a run that finishes in minutes on two CPU cores."""


def write_study_file(base: Path, dest: Path, shrink: Shrink) -> StudyConfig:
    """Copy the study file ``base`` to ``dest`` with ``shrink`` applied; load and validate it."""
    raw = read_yaml(base, "study file", "pass --config with an existing file")
    sections = {key: dict(raw.get(key) or {}) for key in ("model", "train", "retrain")}
    overrides = {
        ("model", "width"): shrink.width,
        ("train", "epochs"): shrink.epochs,
        ("train", "steps_per_epoch"): shrink.steps_per_epoch,
        ("train", "eval_stride"): shrink.eval_stride,
        ("retrain", "epochs"): shrink.retrain_epochs,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            sections[section][key] = value
    if shrink.retrain_patches is not None:
        options = dict(sections["retrain"].get("dataset_options") or {})
        options["patches_per_image"] = shrink.retrain_patches
        sections["retrain"]["dataset_options"] = options
    raw.update({key: value for key, value in sections.items() if value})
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_study(dest)


def default_source(study: StudyConfig) -> str | None:
    """``$DRIVE_ROOT`` or the shared DRIVE folder for DRIVE; else the study file's source."""
    if study.dataset.name != "drive":
        return study.dataset.source
    return str(Path(os.environ.get("DRIVE_ROOT") or DEFAULT_DRIVE).resolve())


@contextlib.contextmanager
def working_directory(path: Path | None) -> Iterator[Path]:
    """Run a block in ``path`` (created if missing and kept), else in a temporary folder."""
    with contextlib.ExitStack() as stack:
        if path is None:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mapnet-study-")))
        path = path.resolve()
        path.mkdir(parents=True, exist_ok=True)
        stack.enter_context(contextlib.chdir(path))
        yield path


@dataclass(frozen=True)
class StudyResult:
    """What :func:`run_study` measured."""

    complete: int
    pruned: int
    failed: int
    wall_s: float
    span_s: float
    best: float
    target_s: float
    samples_per_s: float

    @property
    def trials_per_hour(self) -> float:
        """Finished trials per hour of trial time (first trial start to last trial end)."""
        return (self.complete + self.pruned) * 3600 / self.span_s if self.span_s else math.nan


def run_study(
    study: StudyConfig,
    name: str,
    trials: int,
    source: str | None,
    device: str | None,
    timeout_s: float | None,
    target: float,
) -> StudyResult:
    """Run the study in the current directory and measure it.

    The dataset is prepared (cached) first, so that the wall time is the search alone: the
    stores' creation, loading the prepared data and the trials.
    """
    prepare(study.dataset.name, source, study.dataset.options)
    request = SearchRequest(
        study=study,
        study_name=name,
        storage=STORAGE,
        tracking_uri=TRACKING_URI,
        trials=trials,
        timeout_s=timeout_s,
        source=source,
        device=device,
    )
    start = time.time()
    result = run_search(request)
    wall_s = time.time() - start
    trials_done = [
        t
        for t in result.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    # Trials that raised (a diverging learning rate, say); not those cut by the time limit.
    failed = [t for t in result.get_trials(deepcopy=False) if "fail_reason" in t.user_attrs]
    span_s = 0.0
    if trials_done:
        first = min(t.datetime_start for t in trials_done)
        last = max(t.datetime_complete for t in trials_done)
        span_s = (last - first).total_seconds()
    complete = [t for t in trials_done if t.state == TrialState.COMPLETE]
    rates = [t.user_attrs["samples_per_s"] for t in complete if "samples_per_s" in t.user_attrs]
    maximize = study.objective.direction == "maximize"
    return StudyResult(
        complete=len(complete),
        pruned=len(trials_done) - len(complete),
        failed=len(failed),
        wall_s=wall_s,
        span_s=span_s,
        best=result.best_value if complete else math.nan,
        target_s=seconds_to_target(trials_done, study.objective.metric, target, maximize, start),
        samples_per_s=sum(rates) / len(rates) if rates else math.nan,
    )


def seconds_to_target(
    trials: Sequence[FrozenTrial], metric: str, target: float, maximize: bool, start: float
) -> float:
    """Seconds from ``start`` (epoch time) until any trial's ``metric`` first met ``target``.

    Each value's time is when the trial logged it to MLflow, right after that epoch's
    validation; NaN when no epoch of any trial got there.
    """
    tracker = Tracker(TRACKING_URI)
    times = [
        point.timestamp / 1e3 - start
        for trial in trials
        if "mlflow_run_id" in trial.user_attrs
        for point in tracker.client.get_metric_history(trial.user_attrs["mlflow_run_id"], metric)
        if (point.value >= target if maximize else point.value <= target)
    ]
    return min(times, default=math.nan)


def _training_line(study: StudyConfig, base: str) -> str:
    """The shrunken study settings in words."""
    train = study.train
    steps = f"at most {train.steps_per_epoch}" if train.steps_per_epoch else "all"
    return (
        f"{base} (dataset {study.dataset.name}) with model width {study.model.width:g}, "
        f"{train.epochs} epoch(s) of {steps} step(s), {study.objective.metric} by "
        f"{train.eval_protocol} at stride {train.eval_stride}"
    )


def study_report(
    study: StudyConfig,
    base: str,
    result: StudyResult,
    trials: int,
    target: float,
    device: torch.device,
) -> str:
    """A Markdown section: machine, versions, date, the shrunken settings and the results.

    ``base`` names the study file the settings were shrunk from.
    """
    metric = study.objective.metric
    lines = [
        *report_header(device, "Study efficiency"),
        f"- study: {_training_line(study, base)}; {trials} trials asked for; sampler "
        f"{study.sampler.name} (seed {study.sampler.seed}), pruner {study.pruner.name}",
        "- wall time: `run_search` end to end (stores created, prepared data loaded, all "
        "trials); trials/hour: finished trials over the time from the first trial's start to "
        "the last one's end",
        f"- time to target: from the start until an epoch of any trial logged {metric} "
        f"{'>=' if study.objective.direction == 'maximize' else '<='} {target:g}",
        "- samples/s: training samples over `fit` time (per-epoch validation included), "
        "mean over the completed trials; failed: trials that raised (those cut by the time "
        "limit are re-queued and not counted)",
        "",
        f"| trials complete / pruned / failed | wall time (s) | trials/hour | best {metric} "
        f"| time to {metric} {target:g} (s) | samples/s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {result.complete} / {result.pruned} / {result.failed} | {result.wall_s:.1f} "
        f"| {result.trials_per_hour:.1f} | {result.best:.4f} | {_seconds(result.target_s)} "
        f"| {result.samples_per_s:.1f} |",
    ]
    return "\n".join(lines) + "\n"


def _seconds(value: float) -> str:
    return "not reached" if math.isnan(value) else f"{value:.1f}"


def precision_check(
    study: StudyConfig, source: str | None, device: torch.device, batch_size: int, lr: float
) -> list[tuple[str, engine.FitResult]]:
    """Train the same model on the same batches with bf16 autocast and in IEEE fp32.

    Both runs use a trial's settings from the (shrunken) study file (``search_settings``:
    epochs, step cap, validation, objective, precise BN) with this batch size and lr,
    pos_weight 1, seed 0, no augmentation and no time cap; the fp32 run also turns TF32 off,
    so it is the exact reference.

    Returns:
        ``[("bf16", result), ("fp32", result)]``.
    """
    data = prepare(study.dataset.name, source, study.dataset.options)
    train = data.splits["train"]
    params = {"batch_size": batch_size, "lr": lr, "pos_weight": 1.0}
    runs = []
    for label, amp in (("bf16", True), ("fp32", False)):
        # A trial's settings (its validation, objective and step cap) for this batch and lr,
        # pos_weight 1 and seed 0; without the time cap, so that both runs train every epoch.
        settings = dataclasses.replace(
            search_settings(study, params, 0, train), max_seconds=None, amp=amp
        )
        torch.manual_seed(settings.seed)
        model = build_model(study, data.channels)
        flags = Setting(name=label, tf32=amp)
        with cuda_backend_flags(device, flags):
            result = engine.fit(model, train, data.splits["val"], settings, device=device)
        runs.append((label, result))
    return runs


def precision_report(
    study: StudyConfig,
    base: str,
    runs: list[tuple[str, engine.FitResult]],
    batch_size: int,
    lr: float,
    device: torch.device,
) -> str:
    """A Markdown section comparing the runs of :func:`precision_check` epoch by epoch."""
    metric = study.objective.metric
    (_, fast), (_, reference) = runs
    cpu_note = " (on the CPU both are fp32: autocast is CUDA only)" if device.type == "cpu" else ""
    lines = [
        *report_header(device, "Accuracy of bf16 autocast against fp32"),
        f"- training: {_training_line(study, base)}; batch {batch_size}, lr {lr:g}, "
        "pos_weight 1, no augmentation, seed 0",
        "- bf16: `engine.fit` as the search runs it (bf16 autocast on CUDA, channels_last, "
        "fused Adam, default TF32 flags); fp32: the same with `TrainSettings(amp=False)` and "
        f"TF32 off{cpu_note}",
        "- time: since the start of `fit`, validation included",
        "",
        f"| epoch | bf16 {metric} | fp32 {metric} | difference | bf16 time (s) | fp32 time (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for epoch, (a, b) in enumerate(zip(fast.history, reference.history, strict=True)):
        lines.append(
            f"| {epoch + 1} | {a[metric]:.4f} | {b[metric]:.4f} | {a[metric] - b[metric]:+.4f} "
            f"| {a['time/epoch_end_s']:.1f} | {b['time/epoch_end_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "studies" / "drive.yaml")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU-sized: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()),
    )
    parser.add_argument("--trials", type=int, default=None, help="default 4 (2 with --smoke)")
    parser.add_argument("--study", default=None, help="study name (default <dataset>-bench)")
    parser.add_argument("--width", type=float, default=None, help="model.width")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="train.steps_per_epoch")
    parser.add_argument("--eval-stride", type=int, default=None, help="train.eval_stride")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="retrain.epochs")
    parser.add_argument(
        "--retrain-patches",
        type=int,
        default=None,
        help="retrain.dataset_options.patches_per_image",
    )
    parser.add_argument(
        "--target", type=float, default=0.6, help="objective value whose first arrival is timed"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds after which no new trial starts (a running one is cut)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="kept working directory")
    parser.add_argument("--source", default=None, help="dataset folder")
    parser.add_argument("--device", default=None, help="torch device (default cuda if present)")
    parser.add_argument(
        "--precision-check",
        action="store_true",
        help="instead: bf16 autocast against fp32 on one configuration",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="with --precision-check")
    parser.add_argument("--lr", type=float, default=1e-3, help="with --precision-check")
    parser.add_argument("--append", type=Path, default=None, help="Markdown file to append to")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.trials = args.trials or 4
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, run the study (or the precision check), print and append the report."""
    args = _arguments(argv)
    config = args.config.resolve()
    append = args.append.resolve() if args.append is not None else None
    shrink = Shrink(
        width=args.width,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        eval_stride=args.eval_stride,
        retrain_epochs=args.retrain_epochs,
        retrain_patches=args.retrain_patches,
    )
    device = engine.pick_device(args.device)
    with working_directory(args.workdir) as workdir:
        # Each mode has its own file: the study's must stay as the search recorded it.
        mode = "precision" if args.precision_check else "bench"
        study = write_study_file(config, workdir / f"{config.stem}-{mode}.yaml", shrink)
        source = str(Path(args.source).resolve()) if args.source else default_source(study)
        if args.precision_check:
            runs = precision_check(study, source, device, args.batch_size, args.lr)
            report = precision_report(study, config.name, runs, args.batch_size, args.lr, device)
        else:
            name = args.study or f"{study.dataset.name}-bench"
            result = run_study(
                study, name, args.trials, source, args.device, args.timeout, args.target
            )
            report = study_report(study, config.name, result, args.trials, args.target, device)
            print(f"study '{name}' in {workdir}: {STORAGE}, MLflow {TRACKING_URI}")
    print(report)
    if append is not None:
        with append.open("a", encoding="utf-8") as file:
            file.write("\n" + report)


if __name__ == "__main__":
    main()
