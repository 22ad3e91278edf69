"""The labelled legacy evaluations: BCDU's lung evaluation and the seed notebook's ISIC split."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from mapnet_tune import engine
from mapnet_tune.data import prepare
from mapnet_tune.metrics import PUBLISHED_COLUMNS
from mapnet_tune.model import MAPNet
from mapnet_tune.report import _row_metrics
from mapnet_tune.tracking import ModelVersionInfo
from tests.conftest import write_checkpoint, write_isic, write_lung

CPU = torch.device("cpu")
LEGACY_LABEL = "legacy lung evaluation"


def _mixed_model(data) -> MAPNet:
    """A tiny MAP-Net trained a few full-batch steps, until its test predictions are mixed.

    A random MAP-Net predicts one class nearly everywhere, which would not show whether the
    legacy evaluation uses the prediction at all.
    """
    torch.manual_seed(0)
    model = MAPNet(in_channels=1, width=0.0625)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.from_numpy(data.splits["train"].images)
    y = torch.from_numpy(data.splits["train"].masks).float()
    test = data.splits["test"]
    fov = test.extras["body_fov"] > 0
    for _ in range(10):
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()
        inside = (engine.predict(model, test.images, device=CPU).numpy() >= 0.5)[fov]
        if 0.1 < inside.mean() < 0.9:
            return model.eval()
    raise AssertionError("no mixed predictions after 10 steps; change the seed")


def _printed_row(output: str, after: str) -> dict[str, str]:
    """The table row printed on the line after the line starting with ``after``."""
    lines = output.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(after))
    cells = lines[index + 1].split()
    assert len(cells) == len(PUBLISHED_COLUMNS)
    return {key: cell for (_, key), cell in zip(PUBLISHED_COLUMNS, cells, strict=True)}


def _shift_last_slice(root) -> None:
    """Move the last slice and its mask, so that the test slices differ in their counts."""
    for folder in ("2d_images", "2d_masks"):
        path = sorted((root / folder).iterdir())[-1]
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert cv2.imwrite(str(path), np.roll(array, (8, 5), axis=(0, 1)))


def test_evaluate_prints_the_published_lung_evaluation_of_an_around_lung_model(workdir, cli):
    root = write_lung(workdir / "lung", count=10, size=128)
    _shift_last_slice(root)
    data = prepare("lung", root, {"target": "bcdu-outside", "size": 128})
    model = _mixed_model(data)
    path = write_checkpoint(workdir / "outside.pt", model, data)
    result = cli(
        "evaluate",
        "--checkpoint",
        path,
        "--dataset",
        "lung",
        "--source",
        root,
        "--split",
        "test",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "leaks ground truth through the FOV" in result.output

    # The published evaluation (BCDU evaluate_performance.py), independently in numpy.
    test = data.splits["test"]
    probs = engine.predict(model, test.images, engine.Evaluation(batch_size=2), device=CPU).numpy()
    estimated = (test.extras["body_fov"] > 0) & ~(probs >= 0.5)
    lung = test.extras["lung"] > 0
    tp, fp = np.sum(estimated & lung), np.sum(estimated & ~lung)
    fn, tn = np.sum(~estimated & lung), np.sum(~estimated & ~lung)
    assert min(tp, fp, fn, tn) > 0, "the check needs every kind of pixel"
    se, sp = tp / (tp + fn), tn / (tn + fp)
    expected = {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "sensitivity": se,
        "specificity": sp,
        "accuracy": (tp + tn) / lung.size,
        "legacy_js": (tp + tn) / lung.size,
        "legacy_auc_binary": (se + sp) / 2,
        "iou": tp / (tp + fp + fn),
    }
    printed = _printed_row(result.output, LEGACY_LABEL)
    assert {k: printed[k] for k in expected} == {k: f"{v:.4f}" for k, v in expected.items()}
    # No legacy value exists for these; the around-lung target's own must not stand in.
    assert printed["auc"] == printed["precision"] == printed["iou_per_image"] == "-"

    # The target's own, honest row is still there, and differs from the legacy one.
    honest = _printed_row(result.output, "target (FOV and not lung)")
    around = (probs >= 0.5) & (test.masks > 0)
    iou = around.sum() / ((probs >= 0.5) | (test.masks > 0)).sum()
    assert honest["iou"] == f"{iou:.4f}" != printed["iou"]
    metrics = engine.evaluate(model, test, engine.Evaluation(batch_size=2), "test", device=CPU)
    assert metrics["test/legacy_lung_auc"] == pytest.approx(expected["legacy_auc_binary"])


def test_direct_lung_target_has_no_legacy_row(workdir, cli):
    root = write_lung(workdir / "lung", count=10, size=32)
    data = prepare("lung", root, {"target": "direct", "size": 32})
    torch.manual_seed(0)
    model = MAPNet(in_channels=1, width=0.0625)
    path = write_checkpoint(workdir / "direct.pt", model, data)
    result = cli(
        "evaluate",
        "--checkpoint",
        path,
        "--dataset",
        "lung",
        "--source",
        root,
        "--split",
        "test",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "legacy lung" not in result.output and "leaks" not in result.output
    metrics = engine.evaluate(model, data.splits["test"], engine.Evaluation(), "test", device=CPU)
    assert not any("legacy_lung" in key for key in metrics)


def _version(target: str | None) -> ModelVersionInfo:
    options = {"size": 512} if target is None else {"size": 512, "target": target}
    metrics = {
        "f1": 0.5,
        "sensitivity": 0.6,
        "specificity": 0.7,
        "accuracy": 0.8,
        "auc": 0.9,
        "legacy_js": 0.8,
        "legacy_auc_binary": 0.65,
        "iou": 0.33,
        "iou_per_image": 0.3,
    }
    legacy = {
        "f1": 0.95,
        "sensitivity": 0.96,
        "specificity": 0.97,
        "accuracy": 0.98,
        "auc": 0.965,
        "iou": 0.9,
    }
    tags = {
        "dataset": "lung",
        "dataset.options": json.dumps(options),
        "eval_protocol": "full-image",
        **{f"metric.test/{k}": repr(v) for k, v in metrics.items()},
        **{f"metric.test/legacy_lung_{k}": repr(v) for k, v in legacy.items()},
    }
    return ModelVersionInfo("mapnet-lung", "3", "run", tags, ("champion",))


def test_report_row_of_an_around_lung_model_is_its_labelled_legacy_evaluation():
    label, metrics = _row_metrics(_version("BCDU-outside"), "lung", "test")
    assert "legacy lung evaluation, leaks ground truth" in label
    assert metrics == {
        "test/f1": 0.95,
        "test/sensitivity": 0.96,
        "test/specificity": 0.97,
        "test/accuracy": 0.98,
        "test/legacy_js": 0.98,
        "test/legacy_auc_binary": 0.965,
        "test/iou": 0.9,
    }
    for target in (None, "direct"):
        label, metrics = _row_metrics(_version(target), "lung", "test")
        assert "legacy" not in label and "leaks" not in label
        assert metrics["test/f1"] == 0.5 and metrics["test/legacy_auc_binary"] == 0.65
    # The option only means this on the lung dataset.
    label, metrics = _row_metrics(_version("bcdu-outside"), "isic", "test")
    assert "leaks" not in label and metrics["test/f1"] == 0.5


def test_isic_seed_swap_split_swaps_validation_and_test(tmp_path):
    root = write_isic(tmp_path / "isic", count=10)
    cache = tmp_path / "cache"
    sorted_ = prepare("isic", root, {"size": 16}, cache_dir=cache)
    swapped = prepare("isic", root, {"size": 16, "split": "seed-swap"}, cache_dir=cache)
    # 1815 / 259 / 520 of 10 images: 7 / 1 / 2, the 1-image block in the middle.
    assert [len(sorted_.splits[k].names) for k in ("train", "val", "test")] == [7, 1, 2]
    assert swapped.splits["test"].names == sorted_.splits["val"].names == ("ISIC_0000007",)
    assert swapped.splits["val"].names == sorted_.splits["test"].names
    assert swapped.splits["train"].names == sorted_.splits["train"].names
    for a, b in (("train", "train"), ("val", "test"), ("test", "val")):
        assert np.array_equal(swapped.splits[a].images, sorted_.splits[b].images)
        assert np.array_equal(swapped.splits[a].masks, sorted_.splits[b].masks)
    assert swapped.settings["split_sizes"] == [7, 2, 1]
    assert swapped.fingerprint != sorted_.fingerprint
    notes = [line for line in swapped.card().splitlines() if line.startswith("note")]
    assert any("legacy" in n and "seed-swap" in n and "not recommended" in n for n in notes)
    assert not any("legacy" in line for line in sorted_.card().splitlines())
