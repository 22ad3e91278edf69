"""Latency of a registered model, three ways, in one run on one machine.

- **HTTP**: `mlflow models serve --env-manager local` on loopback, one PNG per request
  (base64 in JSON), the maps back as JSON; what a client of the served model waits for.
- **pyfunc**: `mlflow.pyfunc.load_model(...).predict(image)` in process, a uint8 array in,
  arrays out.
- **predict**: the `mapnet-tune predict` command on PNG files, PNGs out. Its latency is one
  command for one image, start-up and model loading included; its images/s comes from one
  command over all the repeats.

The model is a freshly initialised full-width MAP-Net (``--width``) for 3-channel 8-bit
images, registered in a temporary MLflow store exactly as `retrain-best` registers one (the
weights do not change the speed). Images: 584x565 RGB (a DRIVE photograph's size) and
64x64 RGB.

Usage:
    python benchmarks/serve.py [--width 1.0] [--repeats 10] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mapnet_tune.data import prepare, raw_example
from mapnet_tune.engine import Evaluation
from mapnet_tune.model import MAPNet
from mapnet_tune.modelcard import ModelCard
from mapnet_tune.names import CHAMPION, MODEL_FORMAT_TAG, SERVABLE_FORMAT
from mapnet_tune.predictor import save_folder
from mapnet_tune.retrain.register import requirements
from mapnet_tune.serving import served_code
from mapnet_tune.tracking import Tracker

NAME = "mapnet-serve-benchmark"
SIZES = {"584x565 RGB": (584, 565), "64x64 RGB": (64, 64)}


def register(folder: Path, width: float) -> str:
    """Register a fresh model in the store under ``folder``; return its champion URI."""
    data = prepare(
        "synthetic",
        None,
        {"size": 64, "channels": 3, "count": {"train": 1, "val": 1, "test": 1}},
        cache_dir=folder / "cache",
    )
    torch.manual_seed(0)
    model = MAPNet(in_channels=3, width=width).eval()
    card = ModelCard(
        dataset="synthetic",
        fingerprint=data.fingerprint,
        dataset_options={},
        preprocessing=data.settings,
        study="serve-benchmark",
        trial=0,
        recipe="default",
        params={},
        batch_size=1,
        epochs=0,
        training="untrained",
        trained_on="nothing",
        weights="random initialisation",
        evaluation=Evaluation("full-image", batch_size=1),
        selection_metric="val/iou",
        selection_value=0.0,
    )
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = tracker.experiment("serve-benchmark")
    run = tracker.create_run(experiment, "serve-benchmark", {}, source="benchmarks/serve.py")
    uri, model_id = tracker.log_served_model(
        run,
        save_folder(folder / "model", model, card),
        served_code(folder / "code"),
        raw_example(data),
        {"model_card": card.to_dict()},
        requirements(),
    )
    tags = {MODEL_FORMAT_TAG: SERVABLE_FORMAT}
    version = tracker.register_version(NAME, uri, model_id, run, tags)
    tracker.set_alias(NAME, CHAMPION, version)
    tracker.end_run(run, "FINISHED")
    return f"models:/{NAME}@{CHAMPION}"


def stats(seconds: list[float]) -> dict[str, float]:
    """Median and p95 latency in ms, and images/s over all of them."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * p95,
        "images_s": len(ordered) / sum(ordered),
    }


def timed(call, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, body: bytes) -> None:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        json.loads(response.read())


def serve(model: str, folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start `mlflow models serve` on a free loopback port; return it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow, "models", "serve", "-m", model, "--env-manager", "local", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5):
                return server, url
        except OSError:
            time.sleep(1)
    os.killpg(server.pid, signal.SIGTERM)
    raise RuntimeError("mlflow models serve did not start in 180 s")


def run(width: float, repeats: int) -> list[tuple[str, str, dict[str, float]]]:
    """Every (path, image) measured; rows of (path, image, stats)."""
    import mlflow.pyfunc

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = register(folder, width)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        rng = np.random.default_rng(0)
        images = {k: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for k, hw in SIZES.items()}
        server, url = serve(model, folder, env)
        try:
            for label, image in images.items():
                body = json.dumps({"inputs": [base64.b64encode(png(image)).decode()]}).encode()
                seconds = timed(lambda b=body: post(f"{url}/invocations", b), repeats)
                rows.append(("HTTP (mlflow models serve)", label, stats(seconds)))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        mlflow.set_tracking_uri(uri)
        served = mlflow.pyfunc.load_model(model)
        for label, image in images.items():
            seconds = timed(lambda im=image: served.predict(im), repeats)
            rows.append(("pyfunc in process", label, stats(seconds)))
        command = [str(Path(sys.executable).with_name("mapnet-tune")), "predict", "--model", model]
        for label, image in images.items():
            files = []
            for i in range(repeats):
                files.append(folder / f"image{i}.png")
                files[-1].write_bytes(png(image))
            one = [command + [str(files[0]), "--out", str(folder / "one")]]
            latency = timed(
                lambda c=one[0]: subprocess.run(c, env=env, check=True, capture_output=True), 3, 0
            )
            start = time.perf_counter()
            every = command + [*map(str, files), "--out", str(folder / "all")]
            subprocess.run(every, env=env, check=True, capture_output=True)
            per_call = stats(latency)
            per_call["images_s"] = repeats / (time.perf_counter() - start)
            rows.append(("mapnet-tune predict", label, per_call))
    return rows


def report(rows: list[tuple[str, str, dict[str, float]]], width: float, repeats: int) -> str:
    """The Markdown section: machine, date, settings, one table."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = gpu or f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"
    lines = [
        f"## Serving latency: {machine}, {datetime.date.today().isoformat()}",
        "",
        f"`benchmarks/serve.py --width {width:g} --repeats {repeats}` on {machine}, "
        f"torch {torch.__version__}: a MAP-Net of width {width:g} for 3-channel 8-bit images, "
        f"full-image protocol, registered as `retrain-best` registers one. HTTP and pyfunc: "
        f"{repeats} timed calls after one warm-up; predict: median of 3 one-image commands "
        f"(start-up and model loading included), images/s from one command over {repeats} "
        f"images.",
        "",
        "| path | image | median ms | p95 ms | images/s |",
        "|---|---|---:|---:|---:|",
    ]
    for path, image, s in rows:
        p95 = "-" if path == "mapnet-tune predict" else f"{s['p95_ms']:.0f}"
        lines.append(f"| {path} | {image} | {s['median_ms']:.0f} | {p95} | {s['images_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse options, measure, print the section and optionally append it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="MAP-Net width multiplier")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per path and size")
    parser.add_argument("--append", type=Path, help="Markdown file to append the section to")
    args = parser.parse_args()
    text = report(run(args.width, args.repeats), args.width, args.repeats)
    print(text)
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as file:
            file.write("\n" + text)


if __name__ == "__main__":
    main()
