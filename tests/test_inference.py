"""Inference protocols, `evaluate --checkpoint` and `prepare` through the CLI."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from mapnet_tune import checkpoint, engine
from mapnet_tune.data import Split, prepare
from mapnet_tune.model import MAPNet
from tests.conftest import TINY_STUDY, drive_root, write_checkpoint


class ConstantLogit(nn.Module):
    """Logit ``value`` everywhere, for any input size."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[2:]), self.value)

    forward_padded = forward


def test_sliding_window_and_full_image_agree_for_a_constant_model():
    images = np.random.default_rng(0).random((2, 1, 70, 93), dtype=np.float32)
    model = ConstantLogit(0.7)
    cpu = torch.device("cpu")
    full = engine.predict(model, images, engine.Evaluation("full-image"), device=cpu)
    window = engine.predict(
        model, images, engine.Evaluation("sliding-window", window=32, stride=5), device=cpu
    )
    assert full.shape == window.shape == (2, 1, 70, 93)
    expected = torch.sigmoid(torch.tensor(0.7))
    assert torch.allclose(full, expected) and torch.allclose(window, expected)


def test_sliding_window_averages_overlapping_windows():
    # A model whose logit is the window's mean input: every pixel's probability is then the
    # average over the windows that cover it, which a direct loop reproduces.
    class MeanLogit(nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *x.shape[2:])

    image = np.random.default_rng(1).random((1, 1, 40, 37), dtype=np.float32)
    evaluation = engine.Evaluation("sliding-window", window=32, stride=4)
    got = engine.predict(MeanLogit(), image, evaluation, device=torch.device("cpu"))[0, 0].numpy()
    padded = np.zeros((40, 37 + 3), np.float32)  # (37 - 32) % 4 = 1 -> pad 3 columns
    padded[:, :37] = image[0, 0]
    total, count = np.zeros_like(padded), np.zeros_like(padded)
    for top in range(0, 40 - 32 + 1, 4):
        for left in range(0, 40 - 32 + 1, 4):
            p = 1 / (1 + np.exp(-padded[top : top + 32, left : left + 32].mean()))
            total[top : top + 32, left : left + 32] += p
            count[top : top + 32, left : left + 32] += 1
    np.testing.assert_allclose(got, (total / count)[:, :37], rtol=1e-5)


def test_sliding_window_at_stride_5_never_holds_more_than_a_batch_of_windows():
    # DRIVE's size and the published stride: 105 x 102 windows of 64 px, 16 per forward.
    seen = []

    class Recording(ConstantLogit):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    image = np.random.default_rng(2).random((1, 3, 584, 565), dtype=np.float32)
    evaluation = engine.Evaluation("sliding-window", window=64, stride=5, batch_size=16)
    probs = engine.predict(Recording(0.3), image, evaluation, device=torch.device("cpu"))
    assert sum(seen) == 105 * 102 and max(seen) == 16
    assert torch.allclose(probs, torch.sigmoid(torch.tensor(0.3)))


def test_patch_evaluation_scores_only_the_fov():
    images = np.zeros((1, 1, 64, 64), np.float32)
    masks = np.ones((1, 1, 64, 64), np.uint8)
    fov = np.zeros((1, 1, 64, 64), np.uint8)
    fov[..., :32, :] = 1
    split = Split(images, masks, fov, ("a",), np.array([[0, 0, 0], [0, 16, 16]], np.int32), 48)
    evaluation = engine.Evaluation("patches")
    metrics = engine.evaluate(ConstantLogit(5.0), split, evaluation, device=torch.device("cpu"))
    assert metrics["val/iou"] == 1.0
    assert metrics["val/pixels"] == 48 * 32 + 48 * 16


def test_evaluate_checkpoint_prints_the_published_row(workdir, cli):
    options = TINY_STUDY["dataset"]["options"]
    torch.manual_seed(0)
    model = MAPNet(in_channels=3, width=0.0625)
    path = write_checkpoint(workdir / "m.pt", model, prepare("synthetic", None, options))
    result = cli("evaluate", "--checkpoint", path, "--dataset", "synthetic", "--split", "test")
    assert result.exit_code == 0, result.output
    assert "F1" in result.output and "IoU" in result.output

    data = prepare("synthetic", None, options)
    loaded, _ = checkpoint.load(path)
    expected = engine.evaluate(
        loaded, data.splits["test"], engine.Evaluation(), "test", device=torch.device("cpu")
    )
    assert f"{expected['test/iou']:.4f}" in result.output

    wrong = cli("evaluate", "--checkpoint", path, "--dataset", "synthetic", "--split", "holdout")
    assert wrong.exit_code == 2 and "no 'holdout' split" in wrong.output
    (workdir / "bad.pt").write_bytes(b"garbage")
    bad = cli("evaluate", "--checkpoint", workdir / "bad.pt", "--dataset", "synthetic")
    assert bad.exit_code == 2 and "cannot be loaded" in bad.output


@pytest.mark.drive
def test_prepare_drive_prints_the_card_and_reuses_the_cache(workdir, cli):
    root = drive_root()
    if root is None:
        pytest.skip("MAPNET_TUNE_DRIVE_ROOT is not set")
    first = cli("prepare", "--dataset", "drive", "--source", root)
    assert first.exit_code == 0, first.output
    assert "171,000 training patches" in first.output and "fingerprint" in first.output
    started = time.perf_counter()
    second = cli("prepare", "--dataset", "drive")  # the source is remembered
    assert second.exit_code == 0, second.output
    assert time.perf_counter() - started < 5
    assert second.output == first.output
