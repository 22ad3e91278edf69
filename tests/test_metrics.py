"""Metrics against hand-computed confusion matrices and scikit-learn's ROC-AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mapnet_tune.metrics import (
    PUBLISHED_COLUMNS,
    Confusion,
    MetricAccumulator,
    accuracy,
    balanced_accuracy,
    confusion,
    f1,
    format_header,
    format_row,
    iou,
    legacy_lung_columns,
    legacy_lung_confusion,
    legacy_lung_metrics,
    precision,
    roc_auc,
    sensitivity,
    specificity,
)


def test_confusion_by_hand():
    pred = np.array([1, 1, 0, 0, 1, 0])
    target = np.array([1, 0, 0, 1, 1, 0])
    c = confusion(pred, target)
    assert c == Confusion(tp=2, fp=1, tn=2, fn=1)
    assert accuracy(c) == pytest.approx(4 / 6)
    assert precision(c) == pytest.approx(2 / 3)
    assert sensitivity(c) == pytest.approx(2 / 3)
    assert specificity(c) == pytest.approx(2 / 3)
    assert f1(c) == pytest.approx(2 / 3)
    assert iou(c) == pytest.approx(0.5)


def test_confusion_respects_valid_mask_and_tensors():
    pred = torch.tensor([[True, True], [False, False]])
    target = torch.tensor([[1, 0], [1, 0]])
    valid = torch.tensor([[1, 0], [1, 1]])
    assert confusion(pred, target, valid) == Confusion(tp=1, fp=0, tn=1, fn=1)


def test_sparse_foreground_accuracy_far_from_iou():
    target = np.zeros(1000, bool)
    pred = np.zeros(1000, bool)
    target[:10] = True
    pred[5:15] = True
    c = confusion(pred, target)
    assert c == Confusion(tp=5, fp=5, tn=985, fn=5)
    assert accuracy(c) == pytest.approx(0.99)
    assert iou(c) == pytest.approx(1 / 3)
    assert f1(c) == pytest.approx(0.5)


def test_empty_cases():
    both_empty = Confusion(tp=0, fp=0, tn=10, fn=0)
    assert iou(both_empty) == 1.0 and f1(both_empty) == 1.0
    assert math.isnan(precision(both_empty)) and math.isnan(sensitivity(both_empty))
    assert accuracy(both_empty) == 1.0 and specificity(both_empty) == 1.0
    nothing = Confusion(0, 0, 0, 0)
    assert math.isnan(accuracy(nothing)) and math.isnan(specificity(nothing))
    missed = Confusion(tp=0, fp=0, tn=5, fn=3)
    assert iou(missed) == 0.0 and sensitivity(missed) == 0.0


@pytest.mark.parametrize(
    ("matrix", "expected"),
    [
        # The seed report's raw matrices [[TN, FP], [FN, TP]] and the values derived from them.
        (
            ((14_233_691, 319_192), (259_858, 2_161_083)),
            dict(
                ac=0.96589, se=0.89266, sp=0.97807, pc=0.87131, f1=0.88186, auc=0.93536, iou=0.78868
            ),
        ),
        (
            ((64_436_534, 625_812), (454_270, 14_961_592)),
            dict(
                ac=0.98658, se=0.97053, sp=0.99038, pc=0.95985, f1=0.96516, auc=0.98046, iou=0.93267
            ),
        ),
    ],
)
def test_published_confusion_matrices(matrix, expected):
    (tn, fp), (fn, tp) = matrix
    c = Confusion(tp=tp, fp=fp, tn=tn, fn=fn)
    got = dict(
        ac=accuracy(c),
        se=sensitivity(c),
        sp=specificity(c),
        pc=precision(c),
        f1=f1(c),
        auc=balanced_accuracy(c),
        iou=iou(c),
    )
    assert got == pytest.approx(expected, abs=1e-5)


def test_legacy_lung_evaluation_by_hand():
    # Around-lung probabilities; 0.5 counts as predicted around-lung (>= 0.5).
    probs = np.array([0.9, 0.5, 0.4, 0.2, 0.1, 0.7])
    body_fov = np.array([1, 1, 1, 1, 0, 0])
    lung = np.array([0, 1, 1, 0, 0, 0])
    # Estimated lung = FOV and not predicted: [0, 0, 1, 1, 0, 0].
    c = legacy_lung_confusion(probs, lung, body_fov)
    assert c == Confusion(tp=1, fp=1, tn=3, fn=1)
    assert legacy_lung_confusion(torch.from_numpy(probs), lung, body_fov, threshold=0.55) == (
        Confusion(tp=2, fp=1, tn=3, fn=0)
    )
    assert legacy_lung_metrics(c, "test") == pytest.approx(
        {
            "test/legacy_lung_iou": 1 / 3,
            "test/legacy_lung_f1": 0.5,
            "test/legacy_lung_accuracy": 4 / 6,
            "test/legacy_lung_sensitivity": 0.5,
            "test/legacy_lung_specificity": 0.75,
            "test/legacy_lung_auc": 0.625,
        }
    )


def test_legacy_lung_columns_keep_only_the_legacy_values():
    metrics = {
        "test/iou": 0.1,
        "test/f1": 0.2,
        "test/auc": 0.3,
        "test/legacy_js": 0.4,
        "test/legacy_lung_iou": 0.5,
        "test/legacy_lung_f1": 0.6,
        "test/legacy_lung_accuracy": 0.7,
        "test/legacy_lung_sensitivity": 0.8,
        "test/legacy_lung_specificity": 0.9,
        "test/legacy_lung_auc": 0.85,
        "val/legacy_lung_auc": 0.65,
    }
    assert legacy_lung_columns(metrics) == {
        "test/iou": 0.5,
        "test/f1": 0.6,
        "test/accuracy": 0.7,
        "test/legacy_js": 0.7,
        "test/sensitivity": 0.8,
        "test/specificity": 0.9,
        "test/legacy_auc_binary": 0.85,
        "val/legacy_auc_binary": 0.65,
    }
    assert legacy_lung_columns({"test/iou": 0.1}) == {}


def _random_scores(seed: int, shape=(6, 1, 20, 20), decimals: int | None = None):
    rng = np.random.default_rng(seed)
    probs = rng.random(shape)
    if decimals is not None:
        probs = np.round(probs, decimals)  # many ties
    target = rng.random(shape) < 0.3 + 0.4 * probs
    valid = rng.random(shape) > 0.25
    return probs, target, valid


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auc_matches_sklearn(decimals):
    probs, target, valid = _random_scores(0, decimals=decimals)
    expected = roc_auc_score(target[valid], probs[valid])
    assert roc_auc(probs, target, valid) == pytest.approx(expected, abs=1e-3)
    assert roc_auc(probs, target) == pytest.approx(
        roc_auc_score(target.ravel(), probs.ravel()), abs=1e-3
    )


def test_auc_with_one_class_is_nan():
    assert math.isnan(roc_auc(np.random.default_rng(0).random(50), np.zeros(50)))


def test_accumulator_streams_like_one_batch():
    probs, target, valid = _random_scores(1)
    whole = MetricAccumulator()
    whole.update(probs, target, valid)
    streamed = MetricAccumulator()
    for i in range(0, len(probs), 2):
        streamed.update(
            torch.from_numpy(probs[i : i + 2]),
            torch.from_numpy(target[i : i + 2]),
            torch.from_numpy(valid[i : i + 2]),
        )
    a, b = whole.compute("test"), streamed.compute("test")
    assert a == pytest.approx(b)
    c = confusion(probs >= 0.5, target, valid)
    assert whole.confusion() == c
    assert a["test/iou"] == pytest.approx(iou(c))
    assert a["test/pixels"] == valid.sum()
    assert a["test/auc"] == pytest.approx(roc_auc_score(target[valid], probs[valid]), abs=1e-3)


def test_accumulator_keys_and_legacy_values():
    probs, target, valid = _random_scores(2)
    acc = MetricAccumulator()
    acc.update(probs, target, valid)
    metrics = acc.compute("val", legacy=True)
    names = {
        "iou",
        "f1",
        "accuracy",
        "precision",
        "sensitivity",
        "specificity",
        "auc",
        "iou_per_image",
        "pixels",
        "legacy_js",
        "legacy_auc_binary",
    }
    assert set(metrics) == {f"val/{name}" for name in names}
    c = acc.confusion()
    assert metrics["val/legacy_js"] == pytest.approx(accuracy(c))
    assert metrics["val/legacy_auc_binary"] == pytest.approx((sensitivity(c) + specificity(c)) / 2)
    assert "val/legacy_js" not in acc.compute("val")


def test_per_image_iou_threshold_and_samples_without_pixels():
    probs = np.zeros((3, 1, 2, 2))
    target = np.zeros((3, 1, 2, 2))
    probs[0, 0, 0] = 0.5  # exactly the threshold: foreground
    target[0, 0, 0, 0] = 1  # sample 0: TP 1, FP 1 -> IoU 0.5
    # sample 1: empty prediction and target -> IoU 1.0
    valid = np.ones_like(probs)
    valid[2] = 0  # sample 2 has no evaluated pixel and is left out
    target[2] = 1
    acc = MetricAccumulator()
    acc.update(torch.from_numpy(probs).float(), torch.from_numpy(target), torch.from_numpy(valid))
    metrics = acc.compute()
    assert metrics["val/iou_per_image"] == pytest.approx(0.75)
    assert metrics["val/iou"] == pytest.approx(0.5)
    assert metrics["val/pixels"] == 8


def test_accumulator_without_batches_raises():
    with pytest.raises(ValueError, match="update"):
        MetricAccumulator().compute()


def test_format_row_follows_published_order():
    metrics = {"test/f1": 0.8083, "test/sensitivity": 0.7263, "test/auc": 0.9593}
    row = format_row(metrics, "test").split()
    assert row[:2] == ["0.8083", "0.7263"]
    assert row[[key for _, key in PUBLISHED_COLUMNS].index("auc")] == "0.9593"
    assert row.count("-") == len(PUBLISHED_COLUMNS) - 3
    assert format_header().split()[:5] == ["F1", "Sens", "Spec", "Acc", "AUC"]
