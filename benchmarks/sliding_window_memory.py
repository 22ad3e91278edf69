"""Peak memory of sliding-window prediction on one DRIVE-sized image: chunked against all at once.

The published DRIVE evaluation predicts every ``window`` x ``window`` window at stride 5 and
averages the overlaps. Cutting every window at once (``F.unfold``, as ``engine.predict`` did
before) materialises all of them: 4,221 windows of 256 px on a 584x565 RGB image, 3.3 GB in
float32, plus their probabilities. ``engine.predict`` now cuts and predicts ``batch_size``
windows at a time. Each measurement runs in a fresh process and reports the growth of its
peak resident memory (``ru_maxrss``) over what the process held before predicting.

The model is one 3x3 convolution, so that the numbers show the windowing itself; a real model
adds its activations for one batch of windows in either case.

Usage:
    python benchmarks/sliding_window_memory.py [--windows 64,256] [--stride 5]
        [--batch-size 16] [--append docs/benchmarks.md]
"""

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from throughput import report_header
from torch import nn

from mapnet_tune import engine

HEIGHT, WIDTH, CHANNELS = 584, 565, 3


def all_at_once(model: nn.Module, x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """The previous implementation: every window unfolded at once, folded back."""
    _, c, h, w = x.shape
    ph = max(window, h + (-(h - window)) % stride)
    pw = max(window, w + (-(w - window)) % stride)
    padded = F.pad(x, (0, pw - w, 0, ph - h))
    windows = F.unfold(padded, window, stride=stride)[0].T.reshape(-1, c, window, window)
    probs = torch.empty(len(windows), 1, window, window)
    for i in range(0, len(windows), 16):
        probs[i : i + 16] = torch.sigmoid(model(windows[i : i + 16]))
    flat = probs.reshape(len(windows), -1).T[None]
    summed = F.fold(flat, (ph, pw), window, stride=stride)
    counts = F.fold(torch.ones_like(flat), (ph, pw), window, stride=stride)
    return (summed / counts)[:, :, :h, :w]


def measure(mode: str, window: int, stride: int, batch_size: int, out: dict) -> None:
    """Run one prediction in this (fresh) process; store the peak growth and the time."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Conv2d(CHANNELS, 1, 3, padding=1).eval()
    image = torch.rand(1, CHANNELS, HEIGHT, WIDTH)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "chunked":
            evaluation = engine.Evaluation("sliding-window", window, stride, batch_size)
            probs = engine.predict(model, image, evaluation, device=torch.device("cpu"))
        else:
            probs = all_at_once(model, image, window, stride)
    out["seconds"] = time.perf_counter() - start
    out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out["checksum"] = float(probs.double().sum())


def run(mode: str, window: int, stride: int, batch_size: int) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        out = manager.dict()
        process = context.Process(target=measure, args=(mode, window, stride, batch_size, out))
        process.start()
        process.join()
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="64,256", help="window sides, comma-separated")
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--append", type=Path, default=None, help="Markdown file to append to")
    args = parser.parse_args()
    lines = [
        *report_header(torch.device("cpu"), "Sliding-window peak memory"),
        f"- one {HEIGHT}x{WIDTH} RGB image, stride {args.stride}, batch {args.batch_size} "
        "windows, a 3x3 convolution as the model, one fresh process per row; command: "
        f"`python benchmarks/sliding_window_memory.py --windows {args.windows} "
        f"--stride {args.stride} --batch-size {args.batch_size}`",
        "",
        "| window | windows | all windows as float32 | mode | peak memory growth | time | "
        "same probabilities |",
        "|---:|---:|---:|---|---:|---:|---|",
    ]
    for window in (int(w) for w in args.windows.split(",")):
        ph = max(window, HEIGHT + (-(HEIGHT - window)) % args.stride)
        pw = max(window, WIDTH + (-(WIDTH - window)) % args.stride)
        count = ((ph - window) // args.stride + 1) * ((pw - window) // args.stride + 1)
        size = count * CHANNELS * window * window * 4 / 2**20
        results = {m: run(m, window, args.stride, args.batch_size) for m in ("all", "chunked")}
        same = np.isclose(results["all"]["checksum"], results["chunked"]["checksum"], rtol=1e-5)
        for mode, label in (("all", "all at once (before)"), ("chunked", "chunked (now)")):
            r = results[mode]
            lines.append(
                f"| {window} | {count:,} | {size:,.0f} MiB | {label} | {r['peak_mib']:,.0f} MiB "
                f"| {r['seconds']:.1f} s | {'yes' if same else 'NO'} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append is not None:
        with args.append.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
