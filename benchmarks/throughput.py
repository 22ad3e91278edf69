"""Training-step throughput of MAP-Net: plain fp32 eager, bf16 eager and the fast settings.

One step is forward, BCEWithLogits loss, backward and an Adam step (lr 1e-3) on random data.
Throughput is reported in images/s and in achieved TFLOP/s, counting
training FLOPs = 3 x forward FLOPs = 6 x MACs per image, with MACs from ``count_macs``
(convolutions and dense layers only).

With ``--concurrent K[,K2...]`` it measures instead how the fast step scales when K processes
share one device, as K search trials packed on one GPU would: each process times the same
number of steps, all starting together, and the aggregate images/s is set against one process.

Usage:
    python benchmarks/throughput.py [--device cuda|cpu] [--sizes 64,256,512] [--steps N]
        [--warmup N] [--batch 64,16,4] [--compile] [--concurrent 2,4]
        [--append docs/benchmarks.md]

``measure`` is importable for other benchmarks.
"""

import argparse
import contextlib
import datetime
import functools
import math
import multiprocessing
import multiprocessing.queues
import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mapnet_tune.model import MAPNet, count_macs

IN_CHANNELS = {64: 1, 256: 3, 512: 1}
"""Input channels per size: grey DRIVE patches, RGB ISIC images, grey lung slices."""

DEFAULT_BATCH = {
    "cuda": {64: 64, 256: 16, 512: 4},
    "cpu": {64: 4, 256: 1, 512: 1},
}
DEFAULT_SIZES = {"cuda": (64, 256, 512), "cpu": (64, 256)}
DEFAULT_STEPS = {"cuda": 20, "cpu": 5}
DEFAULT_WARMUP = {"cuda": 5, "cpu": 2}
COMPILE_WARMUP = 10
"""Warm-up steps when compiling: the first steps trigger (re)compilation."""
CONCURRENT_WAIT_S = 600
"""How long concurrent processes wait for each other to start timing, and for their results."""

FLOP_CONVENTION = "training FLOPs = 3 x forward FLOPs = 6 x MACs per image"


@dataclass(frozen=True)
class Setting:
    """How a training step is run.

    Attributes:
        name: Label in the table.
        autocast: Run forward and loss under bf16 autocast.
        channels_last: Convert model and inputs to channels_last.
        fused_adam: Use ``Adam(fused=True)``.
        compile: Wrap the model in ``torch.compile``.
        tf32: Keep PyTorch's default TF32 use on CUDA (cuDNN convolutions); False forces
            IEEE fp32 for convolutions and matmuls.
        cudnn_benchmark: Let cuDNN time its algorithms for each new shape on CUDA.
    """

    name: str
    autocast: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False


def fast_setting(device: torch.device, compile_fast: bool) -> Setting:
    """The fast setting: how ``mapnet_tune.engine.fit`` trains, plus cuDNN autotuning.

    channels_last everywhere, plus bf16 autocast, fused Adam, default TF32 flags and
    ``cudnn.benchmark`` on CUDA, plus ``torch.compile`` when asked. The engine itself leaves
    ``cudnn.benchmark`` at PyTorch's default and does not compile.
    """
    cuda = device.type == "cuda"
    return Setting(
        name="fast + compile" if compile_fast else "fast",
        autocast=cuda,
        channels_last=True,
        fused_adam=cuda,
        compile=compile_fast,
        tf32=cuda,
        cudnn_benchmark=cuda,
    )


def default_settings(device: torch.device, compile_fast: bool) -> list[Setting]:
    """The naive baseline, bf16 alone (CUDA only) and the fast setting for ``device``.

    The baseline is plain fp32 eager with TF32 off. "bf16 eager" adds only bf16 autocast to
    PyTorch's defaults, so that the table separates what autocast gives from what the rest of
    the fast setting (:func:`fast_setting`) adds. It is left out on the CPU, where bf16
    autocast is a different code path that says nothing about GPU training.
    """
    settings = [Setting(name="fp32 eager")]
    if device.type == "cuda":
        settings.append(Setting(name="bf16 eager", autocast=True, tf32=True))
    return [*settings, fast_setting(device, compile_fast)]


@functools.cache
def forward_macs(in_channels: int, size: int) -> int:
    """MACs of one forward pass on one ``in_channels`` x ``size`` x ``size`` image."""
    # On the meta device the count costs no arithmetic, even for 512 x 512.
    with torch.device("meta"):
        model = MAPNet(in_channels=in_channels)
    return count_macs(model, torch.zeros(1, in_channels, size, size, device="meta"))


@contextlib.contextmanager
def cuda_backend_flags(device: torch.device, setting: Setting) -> Iterator[None]:
    """Apply ``setting``'s TF32 and cuDNN autotuning flags on CUDA for a block, then restore."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (
        cudnn.conv.fp32_precision,
        cudnn.rnn.fp32_precision,
        matmul.fp32_precision,
        cudnn.benchmark,
    )
    if not setting.tf32:
        # cuDNN convolutions use TF32 by default; conv and rnn are set together because torch
        # refuses to answer the legacy allow_tf32 query when they disagree.
        cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
        matmul.fp32_precision = "ieee"
    cudnn.benchmark = setting.cudnn_benchmark
    try:
        yield
    finally:
        (
            cudnn.conv.fp32_precision,
            cudnn.rnn.fp32_precision,
            matmul.fp32_precision,
            cudnn.benchmark,
        ) = saved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    setting: Setting,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    in_channels: int | None = None,
    seed: int = 0,
    before_timing: Callable[[], object] | None = None,
) -> dict[str, str | int | float]:
    """Time ``steps`` training steps of a freshly built full-width MAP-Net.

    Args:
        setting: How the step runs.
        size: Square input side.
        batch: Images per step.
        steps: Timed steps.
        warmup: Untimed steps before timing (compilation, cuDNN autotuning, allocator).
        device: Where to run.
        in_channels: Image channels; defaults to :data:`IN_CHANNELS` for ``size``, else 3.
        seed: Seed for the weights and the random batch.
        before_timing: Called after the warm-up, right before the timed steps (to start
            several processes' timing together).

    Returns:
        A row with ``setting``, ``input`` (``CxHxW``), ``batch``, ``step_ms``,
        ``images_per_s``, ``tflops`` and ``peak_gib`` (CUDA only, else NaN). When CUDA runs out
        of memory the timings are NaN and ``setting`` says so.
    """
    in_channels = in_channels or IN_CHANNELS.get(size, 3)
    row: dict[str, str | int | float] = {
        "setting": setting.name,
        "input": f"{in_channels}x{size}x{size}",
        "batch": batch,
    }
    torch.manual_seed(seed)
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = MAPNet(in_channels=in_channels).to(device, memory_format=memory_format).train()
    optimiser = torch.optim.Adam(
        model.parameters(), lr=1e-3, **({"fused": True} if setting.fused_adam else {})
    )
    forward = torch.compile(model) if setting.compile else model
    loss_fn = nn.BCEWithLogitsLoss()
    x = torch.rand(batch, in_channels, size, size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.autocast)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(forward(x), y)
        loss.backward()
        optimiser.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with cuda_backend_flags(device, setting):
            for _ in range(warmup):
                step()
            _synchronize(device)
            if before_timing is not None:
                before_timing()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _synchronize(device)
            elapsed = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError:
        row["setting"] = f"{setting.name} (out of memory)"
        elapsed = float("nan")
    images_per_s = batch * steps / elapsed
    row["step_ms"] = 1e3 * elapsed / steps
    row["images_per_s"] = images_per_s
    row["tflops"] = images_per_s * 6 * forward_macs(in_channels, size) / 1e12
    cuda = device.type == "cuda"
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return row


def device_description(device: torch.device) -> str:
    """Human-readable name of the machine that ran the benchmark."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"


def report_header(device: torch.device, title: str) -> list[str]:
    """The opening lines of a Markdown section: the title, machine, torch version and date."""
    torch_version = torch.__version__
    if device.type == "cuda":
        torch_version += f", CUDA {torch.version.cuda}"
    today = datetime.date.today()
    return [
        f"## {title}: {device_description(device)}, {today}",
        "",
        f"- machine: {device_description(device)}",
        f"- torch {torch_version}",
        f"- date: {today}",
    ]


def format_report(
    rows: Sequence[dict[str, str | int | float]],
    device: torch.device,
    settings: Sequence[Setting],
    steps: int,
    warmup: int,
) -> str:
    """A Markdown section: machine, versions, date, conventions and the results table."""
    shapes = sorted({tuple(int(n) for n in str(r["input"]).split("x")) for r in rows})
    macs = ", ".join(
        f"{forward_macs(c, h) / 1e9:.3f} G ({c}x{h}x{w})"
        for c, h, w in sorted(shapes, key=lambda shape: shape[1])
    )
    lines = [
        *report_header(device, "Training throughput"),
        "- step: forward, BCEWithLogits loss, backward, Adam (lr 1e-3) on random data",
        f"- timing: {steps} timed steps after {warmup} untimed warm-up step(s)",
        f"- FLOP convention: {FLOP_CONVENTION}; forward MACs by `count_macs` "
        f"(convolutions and dense layers): {macs}",
    ]
    if device.type == "cpu":
        lines.append(
            "- note: CPU numbers are only a smoke test that the benchmark runs; "
            "they say nothing about GPU training speed"
        )
        lines.append("- bf16 eager: CUDA only, not run on the CPU")
    for setting in settings:
        parts = [
            "bf16 autocast" if setting.autocast else "fp32",
            "channels_last" if setting.channels_last else "NCHW",
            "fused Adam" if setting.fused_adam else "default Adam",
            "torch.compile" if setting.compile else "eager",
        ]
        if device.type == "cuda":
            parts.append("default TF32 flags" if setting.tf32 else "TF32 off")
            parts.append("cudnn.benchmark" if setting.cudnn_benchmark else "default cuDNN")
        lines.append(f"- {setting.name}: {', '.join(parts)}")
    cells = [
        [
            r["setting"],
            r["input"],
            str(r["batch"]),
            f"{r['step_ms']:.1f}",
            f"{r['images_per_s']:.2f}",
            f"{r['tflops']:.3f}",
        ]
        for r in rows
    ]
    head = ["setting", "input", "batch", "step (ms)", "images/s", "TFLOP/s"]
    lines += _table(head, "ll", cells, rows, "peak memory (GiB)", device)
    return "\n".join(lines) + "\n"


def _table(
    head: list[str],
    left: str,
    cells: list[list[str]],
    rows: list[dict],
    peak_title: str,
    device: torch.device,
) -> list[str]:
    """Markdown table lines: the first ``len(left)`` columns left-aligned, the rest numbers;
    on CUDA a last column with each row's ``peak_gib``."""
    rule = ["---"] * len(left) + ["---:"] * (len(head) - len(left))
    if device.type == "cuda":
        head, rule = [*head, peak_title], [*rule, "---:"]
        cells = [[*c, f"{r['peak_gib']:.2f}"] for c, r in zip(cells, rows, strict=True)]
    return [
        "",
        f"| {' | '.join(head)} |",
        f"|{'|'.join(rule)}|",
        *(f"| {' | '.join(c)} |" for c in cells),
    ]


def run(
    device: torch.device,
    sizes: Sequence[int],
    batches: Sequence[int],
    steps: int,
    warmup: int,
    compile_fast: bool,
) -> str:
    """Measure every setting at every size and return the Markdown report."""
    settings = default_settings(device, compile_fast)
    rows = [
        measure(setting, size, batch, steps, warmup, device)
        for size, batch in zip(sizes, batches, strict=True)
        for setting in settings
    ]
    return format_report(rows, device, settings, steps, warmup)


def _measure_in_process(
    setting: Setting,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    kind: str,
    barrier: threading.Barrier,
    results: multiprocessing.queues.Queue,
) -> None:
    """One of several concurrent processes: :func:`measure`, timed from a shared barrier."""
    row = None
    try:
        # A broken barrier means another process failed first; its own error says why.
        with contextlib.suppress(threading.BrokenBarrierError):
            row = measure(
                setting, size, batch, steps, warmup, torch.device(kind), before_timing=barrier.wait
            )
    finally:
        # Every process has passed the barrier once any is done timing, so breaking it here
        # only releases the others when this one failed before reaching it.
        barrier.abort()
        results.put(row)


def measure_concurrent(
    setting: Setting,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    processes: int,
) -> dict[str, str | int | float]:
    """Time ``setting`` in ``processes`` processes sharing ``device``, all timing together.

    Each process builds its own model and batch (as separate search trials would), warms up,
    waits for the others and times ``steps`` steps.

    Returns:
        A row with ``processes``, ``input``, ``batch`` (per process), ``per_process`` (mean
        images/s of one process), ``aggregate`` (all processes' images over the slowest
        process's time) and ``peak_gib`` (the largest per-process peak; NaN on the CPU). A
        process that failed or ran out of memory makes the timings NaN.
    """
    # CUDA cannot be used in a forked child, so every process starts afresh.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes, timeout=CONCURRENT_WAIT_S)
    results = context.Queue()
    args = (setting, size, batch, steps, warmup, device.type, barrier, results)
    workers = [context.Process(target=_measure_in_process, args=args) for _ in range(processes)]
    for worker in workers:
        worker.start()
    rows = []
    for _ in workers:
        try:
            rows.append(results.get(timeout=CONCURRENT_WAIT_S))
        except queue.Empty:
            rows.append(None)
    for worker in workers:
        worker.join()
    in_channels = IN_CHANNELS.get(size, 3)
    nan = float("nan")
    row: dict[str, str | int | float] = {
        "processes": processes,
        "input": f"{in_channels}x{size}x{size}",
        "batch": batch,
        "per_process": nan,
        "aggregate": nan,
        "peak_gib": nan,
    }
    if all(r is not None and math.isfinite(float(r["step_ms"])) for r in rows):
        slowest_s = max(float(r["step_ms"]) for r in rows) * steps / 1e3
        row["per_process"] = sum(float(r["images_per_s"]) for r in rows) / processes
        row["aggregate"] = processes * batch * steps / slowest_s
        row["peak_gib"] = max(float(r["peak_gib"]) for r in rows)
    return row


def format_concurrent_report(
    rows: Sequence[dict[str, str | int | float]],
    device: torch.device,
    setting: Setting,
    steps: int,
    warmup: int,
) -> str:
    """A Markdown section for :func:`run_concurrent`: conventions and the scaling table."""
    lines = [
        *report_header(device, "Concurrent training processes"),
        f"- step: the {setting.name} training step as in the throughput table, in each of "
        f"several processes on the one device",
        f"- timing: each process times {steps} steps after {warmup} untimed warm-up step(s); "
        f"all start timing together",
        "- aggregate: all processes' images / the slowest process's time; "
        "vs 1: aggregate / the aggregate of one process",
    ]
    cuda = device.type == "cuda"
    if cuda:
        lines.append(
            "- peak memory: torch's allocations in one process; each process also holds a "
            "CUDA context of its own"
        )
    else:
        lines.append(
            "- note: on the CPU the processes share the same cores, so this only shows that "
            "the measurement runs"
        )
    single = {r["input"]: r["aggregate"] for r in rows if r["processes"] == 1}
    cells = [
        [
            str(r["processes"]),
            r["input"],
            str(r["batch"]),
            f"{r['per_process']:.2f}",
            f"{r['aggregate']:.2f}",
            f"{float(r['aggregate']) / float(single.get(r['input'], float('nan'))):.2f}",
        ]
        for r in rows
    ]
    head = [
        "processes",
        "input",
        "batch per process",
        "images/s per process",
        "aggregate images/s",
        "vs 1",
    ]
    lines += _table(head, "ll", cells, rows, "peak memory per process (GiB)", device)
    return "\n".join(lines) + "\n"


def run_concurrent(
    device: torch.device,
    sizes: Sequence[int],
    batches: Sequence[int],
    steps: int,
    warmup: int,
    compile_fast: bool,
    counts: Sequence[int],
) -> str:
    """Measure the fast step in 1 and in each of ``counts`` processes; the Markdown report."""
    setting = fast_setting(device, compile_fast)
    rows = [
        measure_concurrent(setting, size, batch, steps, warmup, device, processes)
        for size, batch in zip(sizes, batches, strict=True)
        for processes in sorted({1, *counts})
    ]
    return format_concurrent_report(rows, device, setting, steps, warmup)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, run the benchmark, print the report and optionally append it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--sizes", type=_int_list, default=None, help="e.g. 64,256,512")
    parser.add_argument(
        "--batch", type=_int_list, default=None, help="one batch size, or one per size"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast setting")
    parser.add_argument(
        "--concurrent",
        type=_int_list,
        default=None,
        metavar="K[,K2...]",
        help="instead: the fast step in K processes at once on one device, against 1 process",
    )
    parser.add_argument("--append", type=Path, default=None, help="Markdown file to append to")
    args = parser.parse_args(argv)

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    if args.concurrent is not None and not all(k >= 1 for k in args.concurrent):
        parser.error(f"--concurrent needs process counts of at least 1, got {args.concurrent}")
    sizes = args.sizes or list(DEFAULT_SIZES[kind])
    batches = args.batch or [DEFAULT_BATCH[kind].get(size, 1) for size in sizes]
    if len(batches) == 1:
        batches = batches * len(sizes)
    if len(batches) != len(sizes):
        parser.error(f"--batch needs one value or one per size ({len(sizes)}), got {batches}")
    warmup = args.warmup
    if warmup is None:
        warmup = COMPILE_WARMUP if args.compile else DEFAULT_WARMUP[kind]
    steps = args.steps or DEFAULT_STEPS[kind]

    device = torch.device(kind)
    if args.concurrent is not None:
        report = run_concurrent(
            device, sizes, batches, steps, warmup, args.compile, args.concurrent
        )
    else:
        report = run(device, sizes, batches, steps, warmup, args.compile)
    print(report)
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as file:
            file.write("\n" + report)


if __name__ == "__main__":
    main()
