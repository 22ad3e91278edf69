"""BatchNorm lag and the batch-size ranking: validation with running statistics vs precise BN.

Trials that differ only in batch size (same epochs, lr, pos_weight and seed) train on a small
synthetic set with the official BatchNorm momentum 0.01. After every epoch the same weights
are scored twice on the validation split: with the running statistics that training left
(what ``engine.fit`` reports without precise BN) and, on a copy, after
``engine.recompute_bn_stats`` over N un-augmented training batches from
``engine.precise_bn_stream`` (what it reports with ``TrainSettings(precise_bn_batches=N)``).
Training itself never sees the precise statistics, so both columns describe the same weights.

With few steps per epoch (a large batch on a small set) the running statistics are still
mostly their initial values (mean 0, variance 1) at the first pruning rungs; the table shows
how much of the gap between batch sizes is that lag rather than model quality.

Usage:
    python benchmarks/precise_bn.py [--batch-sizes 4,16] [--epochs 6] [--lr 2e-3]
        [--precise-bn-batches 4,16] [--train 144] [--width 0.25] [--seed 0] [--device cpu]
        [--append docs/benchmarks.md]
"""

import argparse
import copy
import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from throughput import report_header

from mapnet_tune import engine
from mapnet_tune.data import prepare
from mapnet_tune.model import MAPNet

BN_MOMENTUM = 0.01
"""MAP-Net's official BatchNorm momentum (PyTorch convention)."""
POS_WEIGHT = 2.0


def run_trial(data, batch_size: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Train one trial; per epoch, val/iou with running and with precise statistics.

    Returns:
        ``{"steps": steps per epoch, "rows": [per-epoch dicts], "epoch_s": median training
        epoch seconds (validations excluded), "precise_s": {N: median seconds of one
        re-estimation}}``.
    """
    train, val = data.splits["train"], data.splits["val"]
    torch.manual_seed(args.seed)
    model = MAPNet(train.images.shape[1], 1, width=args.width, bn_momentum=BN_MOMENTUM)
    settings = engine.TrainSettings(
        epochs=args.epochs,
        batch_size=batch_size,
        lr=args.lr,
        pos_weight=POS_WEIGHT,
        evaluation=engine.Evaluation(protocol="full-image", batch_size=16),
        seed=args.seed,
    )
    rows: list[dict] = []
    precise_s: dict[int, list[float]] = {n: [] for n in args.precise_bn_batches}
    callback_s: list[float] = []
    validation_s: list[float] = []

    def on_epoch(
        epoch: int, metrics: dict[str, float], net: torch.nn.Module, improved: bool
    ) -> None:
        entered = time.perf_counter()
        row = {"epoch": epoch + 1, "running": metrics["val/iou"]}
        for n in args.precise_bn_batches:
            # A copy, so that training goes on with its own running statistics.
            twin = copy.deepcopy(net)
            stream = engine.precise_bn_stream(train, settings, device)
            start = time.perf_counter()
            engine.recompute_bn_stats(twin, stream, n, device=device, amp=settings.amp)
            scored = time.perf_counter()
            row[n] = engine.evaluate(
                twin, val, settings.evaluation, device=device, amp=settings.amp
            )["val/iou"]
            precise_s[n].append(scored - start)
            validation_s.append(time.perf_counter() - scored)
        rows.append(row)
        callback_s.append(time.perf_counter() - entered)

    result = engine.fit(model, train, val, settings, on_epoch=on_epoch, device=device)
    ends = [0.0] + [h["time/epoch_end_s"] for h in result.history]
    # time/epoch_end_s is taken after fit's validation and before this callback: an epoch's
    # training is the time between two ends less the previous callback and one validation
    # (timed here on the twin, the same call fit makes).
    validation = sum(validation_s) / len(validation_s)
    train_s = [
        ends[e + 1] - ends[e] - (callback_s[e - 1] if e else 0.0) - validation
        for e in range(len(rows))
    ]
    # Medians: the first epoch and the first re-estimation pay for oneDNN's kernel set-up.
    return {
        "steps": len(train.images) // batch_size,
        "rows": rows,
        "epoch_s": statistics.median(train_s),
        "precise_s": {n: statistics.median(t) for n, t in precise_s.items()},
    }


def _cost(trial: dict, batch_size: int, ns: Sequence[int]) -> str:
    parts = [
        f"N={n} {trial['precise_s'][n]:.2f} s ({trial['precise_s'][n] / trial['epoch_s']:.0%})"
        for n in ns
    ]
    return f"batch {batch_size}: {', '.join(parts)} of {trial['epoch_s']:.2f} s"


def _ranking(values: dict[int, float]) -> str:
    """Batch sizes from the best score to the worst, ``4 > 16`` (``4 = 16`` for a tie)."""
    groups = itertools.groupby(sorted(values, key=lambda b: -values[b]), key=values.get)
    return " > ".join(" = ".join(str(b) for b in group) for _, group in groups)


def format_report(
    trials: dict[int, dict], args: argparse.Namespace, device: torch.device, seconds: float
) -> str:
    """A Markdown section: machine, versions, date, setup and the per-epoch table."""
    sizes = list(trials)
    ns = args.precise_bn_batches
    lines = [
        *report_header(device, "Precise BatchNorm and the batch-size ranking"),
        f"- data: synthetic, 64x64 RGB, {args.train} training and 16 validation images",
        f"- model: MAP-Net width {args.width}, BatchNorm momentum {BN_MOMENTUM} (official)",
        f"- trials: batch size {', '.join(map(str, sizes))}; otherwise identical: "
        f"{args.epochs} epochs, Adam lr {args.lr:g}, pos_weight {POS_WEIGHT:g}, no "
        f"augmentation, seed {args.seed}",
        "- steps per epoch: " + ", ".join(f"{trials[b]['steps']} (batch {b})" for b in sizes),
        "- val/iou on the full validation images after each epoch, the same weights scored "
        "with the running statistics training left (`running`) and with precise BN over N "
        "un-augmented training batches (`precise N`)",
        "- median time of one precise BN against one training epoch (validation excluded): "
        + "; ".join(_cost(trials[b], b, ns) for b in sizes),
        f"- whole run: {seconds:.0f} s; command: `python benchmarks/precise_bn.py "
        f"--batch-sizes {','.join(map(str, sizes))} --epochs {args.epochs} --lr {args.lr:g} "
        f"--precise-bn-batches {','.join(map(str, ns))} --train {args.train} "
        f"--width {args.width} --seed {args.seed}`",
        "",
    ]
    columns = [("running", "running")] + [(n, f"precise {n}") for n in ns]
    header = ["epoch"] + [f"b{b} {label}" for b in sizes for _, label in columns]
    header += [f"ranking {label}" for _, label in columns]
    lines += [
        "| " + " | ".join(header) + " |",
        "|---:|" + "---:|" * (len(sizes) * len(columns)) + "---|" * len(columns),
    ]
    for e in range(args.epochs):
        cells = [str(e + 1)]
        for b in sizes:
            cells += [f"{trials[b]['rows'][e][key]:.4f}" for key, _ in columns]
        for key, _ in columns:
            cells.append(_ranking({b: trials[b]["rows"][e][key] for b in sizes}))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=_ints, default=[4, 16])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--precise-bn-batches",
        type=_ints,
        default=[4, 16],
        help="batch counts N to re-estimate the statistics over",
    )
    parser.add_argument("--train", type=int, default=144, help="training images")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--append", type=Path, default=None, help="Markdown file to append to")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, train the trials, print the report and optionally append it."""
    args = _arguments(argv)
    device = engine.pick_device(args.device)
    data = prepare(
        "synthetic",
        None,
        {
            "size": 64,
            "channels": 3,
            "seed": 0,
            "count": {"train": args.train, "val": 16, "test": 1},
        },
    )
    start = time.perf_counter()
    trials = {b: run_trial(data, b, args, device) for b in args.batch_sizes}
    report = format_report(trials, args, device, time.perf_counter() - start)
    print(report)
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as file:
            file.write("\n" + report)


if __name__ == "__main__":
    main()
