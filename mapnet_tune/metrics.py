"""Segmentation metrics from pooled confusion counts and binned probabilities.

A pixel is foreground when its probability is >= the threshold (0.5, as BCDU's DRIVE
evaluation does). Counts are pooled over every evaluated pixel of a set (its FOV when there is
one). ROC-AUC is the continuous one, computed from score histograms so that memory does not
grow with the number of pixels.

Undefined ratios: IoU and F1 are 1.0 when neither target nor prediction has a foreground
pixel (TP + FP + FN = 0: perfect agreement on an empty image or patch); accuracy, precision,
sensitivity and specificity are NaN when their denominator is 0; AUC is NaN when one class is
absent.

The published tables' "JS" is pixel accuracy and their lung/ISIC "AUC" is (SE + SP) / 2 from
thresholded scores; :meth:`MetricAccumulator.compute` reports them, labelled "legacy", when
asked. The published lung evaluation of an around-lung model (estimated lung = FOV and not the
prediction) is :func:`legacy_lung_confusion`, labelled "legacy_lung" because it leaks ground
truth through the FOV.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class Confusion(NamedTuple):
    """Pooled pixel counts with foreground = 1."""

    tp: int
    fp: int
    tn: int
    fn: int


def confusion(pred: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None) -> Confusion:
    """Count TP, FP, TN, FN of a binary prediction over the valid pixels.

    Args:
        pred: Binary prediction (bool or 0/1), any shape.
        target: Binary ground truth of the same shape.
        valid: Optional mask of the pixels to count (e.g. the FOV); all pixels when None.
    """
    p, t = _as_bool(pred), _as_bool(target)
    v = _as_bool(valid) if valid is not None else torch.ones_like(p)
    tp = int((p & t & v).sum())
    fp = int((p & ~t & v).sum())
    fn = int((~p & t & v).sum())
    return Confusion(tp, fp, int(v.sum()) - tp - fp - fn, fn)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def accuracy(c: Confusion) -> float:
    """(TP + TN) / all; the published "JS" column."""
    return _ratio(c.tp + c.tn, c.tp + c.tn + c.fp + c.fn)


def precision(c: Confusion) -> float:
    """TP / (TP + FP)."""
    return _ratio(c.tp, c.tp + c.fp)


def sensitivity(c: Confusion) -> float:
    """TP / (TP + FN), also called recall."""
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float:
    """TN / (TN + FP)."""
    return _ratio(c.tn, c.tn + c.fp)


def f1(c: Confusion) -> float:
    """2 TP / (2 TP + FP + FN), the Dice coefficient of pooled counts; 1.0 when both are empty."""
    denominator = 2 * c.tp + c.fp + c.fn
    return 2 * c.tp / denominator if denominator else 1.0


def iou(c: Confusion) -> float:
    """TP / (TP + FP + FN), the true Jaccard index of the foreground; 1.0 when both are empty."""
    denominator = c.tp + c.fp + c.fn
    return c.tp / denominator if denominator else 1.0


def balanced_accuracy(c: Confusion) -> float:
    """(SE + SP) / 2: what ``roc_auc_score`` returns on thresholded scores (legacy "AUC")."""
    return (sensitivity(c) + specificity(c)) / 2


def legacy_lung_confusion(
    probs: ArrayLike, lung: ArrayLike, body_fov: ArrayLike, threshold: float = 0.5
) -> Confusion:
    """Counts of BCDU's lung evaluation of an around-lung (FOV and not lung) prediction.

    The estimated lung is ``body_fov`` and not (``probs`` >= ``threshold``), compared with the
    lung mask over all pixels. The FOV is built from the lung masks, so these counts leak
    ground truth: no estimated lung falls outside it and the outside is free true negatives.
    """
    p = _as_tensor(probs)
    estimated = _as_bool(body_fov, p.device) & ~(p >= threshold)
    return confusion(estimated, _as_bool(lung, p.device))


#: The legacy lung metrics, keyed ``prefix/legacy_lung_NAME``; "auc" is (SE + SP) / 2.
LEGACY_LUNG_METRICS = ("iou", "f1", "accuracy", "sensitivity", "specificity", "auc")


def legacy_lung_metrics(c: Confusion, prefix: str) -> dict[str, float]:
    """The metrics of :func:`legacy_lung_confusion` counts, keyed ``prefix/legacy_lung_NAME``.

    Its "auc" is the binary (SE + SP) / 2 that the published lung tables report as AUC.
    """
    values = {
        "iou": iou(c),
        "f1": f1(c),
        "accuracy": accuracy(c),
        "sensitivity": sensitivity(c),
        "specificity": specificity(c),
        "auc": balanced_accuracy(c),
    }
    return {f"{prefix}/legacy_lung_{name}": values[name] for name in LEGACY_LUNG_METRICS}


def legacy_lung_columns(metrics: Mapping[str, float]) -> dict[str, float]:
    """The legacy lung metrics (any prefix) under the keys of the published columns.

    ``p/legacy_lung_NAME`` becomes ``p/NAME``, its accuracy also ``p/legacy_js`` and its
    binary AUC ``p/legacy_auc_binary``, so a table row shows the published evaluation of an
    around-lung model in the published columns. Everything else is dropped: the continuous
    ROC-AUC, precision and per-image IoU have no legacy lung value, and the around-lung
    target's own metrics must not appear under lung headers.
    """
    renamed = {
        "iou": ("iou",),
        "f1": ("f1",),
        "accuracy": ("accuracy", "legacy_js"),
        "sensitivity": ("sensitivity",),
        "specificity": ("specificity",),
        "auc": ("legacy_auc_binary",),
    }
    columns = {}
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/legacy_lung_")
        for column in renamed.get(name, ()) if prefix else ():
            columns[f"{prefix}/{column}"] = value
    return columns


def roc_auc(
    probs: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None, bins: int = 2**16
) -> float:
    """Continuous ROC-AUC from binned probabilities (ties within a bin count half).

    Args:
        probs: Probabilities in [0, 1].
        target: Binary ground truth of the same shape.
        valid: Optional mask of the pixels to use.
        bins: Histogram bins over [0, 1]; scores closer than 1 / bins count as tied.
    """
    accumulator = MetricAccumulator(bins=bins)
    accumulator.update(
        _as_tensor(probs).reshape(1, -1),
        _as_tensor(target).reshape(1, -1),
        None if valid is None else _as_tensor(valid).reshape(1, -1),
    )
    return accumulator.auc()


#: Metrics whose value depends on the threshold, for which one can be tuned.
TUNABLE_METRICS = ("iou", "f1", "accuracy", "legacy_js", "legacy_auc_binary")


class MetricAccumulator:
    """Streams batches of probabilities and targets; computes pooled metrics at the end.

    State is a few counters and two histograms on the device of the first batch (CPU or CUDA),
    updated without leaving it, so a whole test set costs a fixed, small amount of memory.

    Args:
        threshold: Probabilities >= threshold are foreground.
        bins: Histogram bins over [0, 1] for ROC-AUC.
    """

    def __init__(self, threshold: float = 0.5, bins: int = 2**16) -> None:
        self.threshold = threshold
        self.bins = bins
        self._counts: torch.Tensor | None = None  # tp, fp, tn, fn
        self._per_sample: torch.Tensor | None = None  # sum of per-sample IoU, samples counted
        self._histogram: torch.Tensor | None = None  # (2, bins): negatives, positives

    def update(self, probs: ArrayLike, target: ArrayLike, valid: ArrayLike | None = None) -> None:
        """Add a batch.

        Args:
            probs: Probabilities (N, ...) with samples (images or patches) on the first axis.
            target: Binary ground truth of the same shape (bool, 0/1 or soft labels > 0.5).
            valid: Optional mask of evaluated pixels, broadcastable to ``probs``; samples
                without any valid pixel are left out of the per-sample IoU.
        """
        p = _as_tensor(probs).float()
        n = p.shape[0]
        t = _as_bool(target, p.device).expand_as(p).reshape(n, -1)
        v = (
            _as_bool(valid, p.device).expand_as(p)
            if valid is not None
            else torch.ones_like(p, dtype=torch.bool)
        ).reshape(n, -1)
        p = p.reshape(n, -1)
        pred = p >= self.threshold
        tp = (pred & t & v).sum(1)
        fp = (pred & ~t & v).sum(1)
        fn = (~pred & t & v).sum(1)
        evaluated = v.sum(1)
        counts = torch.stack([tp.sum(), fp.sum(), (evaluated - tp - fp - fn).sum(), fn.sum()])
        union = tp + fp + fn
        sample_iou = torch.where(union > 0, tp.double() / union.clamp(min=1), 1.0)
        has_pixels = evaluated > 0
        per_sample = torch.stack([(sample_iou * has_pixels).sum(), has_pixels.sum().double()])
        # Invalid pixels go to an overflow bin that is dropped, which avoids a data-dependent
        # boolean gather (a device sync on CUDA).
        index = (p * self.bins).long().clamp_(0, self.bins - 1) + self.bins * t.long()
        index = torch.where(v, index, 2 * self.bins)
        histogram = torch.bincount(index.flatten(), minlength=2 * self.bins + 1)
        self._add(counts, per_sample, histogram[: 2 * self.bins].view(2, self.bins))

    def _add(self, counts: torch.Tensor, per_sample: torch.Tensor, histogram: torch.Tensor) -> None:
        if self._counts is None:
            self._counts, self._per_sample, self._histogram = counts, per_sample, histogram
        else:
            self._counts += counts
            self._per_sample += per_sample
            self._histogram += histogram

    def confusion(self) -> Confusion:
        """The pooled confusion counts so far."""
        if self._counts is None:
            raise ValueError("no batches added; call update() first")
        return Confusion(*(int(x) for x in self._counts.tolist()))

    def auc(self) -> float:
        """Continuous ROC-AUC from the histograms (NaN when one class is absent)."""
        if self._histogram is None:
            raise ValueError("no batches added; call update() first")
        negatives, positives = self._histogram.double().cpu().numpy()
        n_pos, n_neg = positives.sum(), negatives.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        # Trapezoidal ROC area: every negative in a bin is beaten by the positives in higher
        # bins and ties with half of the positives in its own bin.
        above = np.cumsum(positives[::-1])[::-1] - positives
        return float((negatives * (above + positives / 2)).sum() / (n_pos * n_neg))

    def roc(self, max_points: int | None = 1000) -> tuple[np.ndarray, np.ndarray]:
        """The ROC curve from the histograms, one point per occupied bin threshold.

        The trapezoidal area under these points (all of them) is :meth:`auc`.

        Args:
            max_points: Keep at most this many points, evenly spaced along the curve and
                always including (0, 0) and (1, 1); None keeps every point.

        Returns:
            (fpr, tpr), both increasing from 0 to 1 (NaN when one class is absent).
        """
        if self._histogram is None:
            raise ValueError("no batches added; call update() first")
        negatives, positives = self._histogram.double().cpu().numpy()
        occupied = (negatives + positives) > 0
        # Thresholds from the highest bin down: each point counts everything at or above it.
        fp = np.concatenate([[0.0], np.cumsum(negatives[occupied][::-1])])
        tp = np.concatenate([[0.0], np.cumsum(positives[occupied][::-1])])
        with np.errstate(invalid="ignore", divide="ignore"):
            fpr, tpr = fp / fp[-1], tp / tp[-1]
        if max_points is not None and len(fpr) > max_points:
            keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
            fpr, tpr = fpr[keep], tpr[keep]
        return fpr, tpr

    def best_threshold(self, name: str) -> tuple[float, float]:
        """The threshold that maximises a pooled metric over everything added, and its value.

        Candidates are the histogram's bin edges k / bins (0 < k < bins): a probability is at
        or above k / bins exactly when its bin is k or higher, so every candidate's counts are
        exact. Among equal values the threshold nearest 0.5 wins.

        Args:
            name: One of :data:`TUNABLE_METRICS`.

        Raises:
            ValueError: Another metric, or no batches added.
        """
        if name not in TUNABLE_METRICS:
            raise ValueError(f"cannot tune a threshold for {name}; use one of {TUNABLE_METRICS}")
        if self._histogram is None:
            raise ValueError("no batches added; call update() first")
        negatives, positives = self._histogram.double().cpu().numpy()
        tp = np.cumsum(positives[::-1])[::-1][1:]
        fp = np.cumsum(negatives[::-1])[::-1][1:]
        fn, tn = positives.sum() - tp, negatives.sum() - fp
        with np.errstate(invalid="ignore", divide="ignore"):
            values = {
                "iou": tp / (tp + fp + fn),
                "f1": 2 * tp / (2 * tp + fp + fn),
                "accuracy": (tp + tn) / (tp + tn + fp + fn),
                "legacy_js": (tp + tn) / (tp + tn + fp + fn),
                "legacy_auc_binary": (tp / (tp + fn) + tn / (tn + fp)) / 2,
            }[name]
        values = np.nan_to_num(values, nan=-np.inf)
        thresholds = np.arange(1, self.bins) / self.bins
        best = np.flatnonzero(values == values.max())
        pick = best[np.argmin(np.abs(thresholds[best] - 0.5))]
        return float(thresholds[pick]), float(values[pick])

    def compute(self, prefix: str = "val", legacy: bool = False) -> dict[str, float]:
        """Metrics of everything added, keyed ``prefix/name``.

        Keys: iou (pooled, TP/(TP+FP+FN)), f1, accuracy, precision, sensitivity, specificity,
        auc (continuous ROC-AUC), iou_per_image (mean over samples with evaluated pixels) and
        pixels (evaluated pixel count). With ``legacy``, also legacy_js (pixel accuracy, what
        the published tables call Jaccard "JS") and legacy_auc_binary ((SE + SP) / 2, the
        published thresholded lung/ISIC "AUC").
        """
        c = self.confusion()
        iou_sum, samples = self._per_sample.tolist()
        metrics = {
            "iou": iou(c),
            "f1": f1(c),
            "accuracy": accuracy(c),
            "precision": precision(c),
            "sensitivity": sensitivity(c),
            "specificity": specificity(c),
            "auc": self.auc(),
            "iou_per_image": iou_sum / samples if samples else float("nan"),
            "pixels": float(sum(c)),
        }
        if legacy:
            metrics["legacy_js"] = accuracy(c)
            metrics["legacy_auc_binary"] = balanced_accuracy(c)
        return {f"{prefix}/{key}": value for key, value in metrics.items()}


# The published tables' column order, then this project's correct columns. (header, key)
PUBLISHED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("F1", "f1"),
    ("Sens", "sensitivity"),
    ("Spec", "specificity"),
    ("Acc", "accuracy"),
    ("AUC", "auc"),
    ("PC", "precision"),
    ("JS(=Acc)", "legacy_js"),
    ("AUC(bin)", "legacy_auc_binary"),
    ("IoU", "iou"),
    ("IoU/img", "iou_per_image"),
)
_WIDTH = 9


def format_header() -> str:
    """The column headers matching :func:`format_row`."""
    return "".join(f"{header:>{_WIDTH}}" for header, _ in PUBLISHED_COLUMNS)


def format_row(metrics: Mapping[str, float], prefix: str) -> str:
    """One table row in :data:`PUBLISHED_COLUMNS` order, 4 decimals, "-" where missing."""
    cells = []
    for _, key in PUBLISHED_COLUMNS:
        value = metrics.get(f"{prefix}/{key}")
        cells.append(f"{value:>{_WIDTH}.4f}" if value is not None else f"{'-':>{_WIDTH}}")
    return "".join(cells)


def _as_tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    tensor = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return tensor if device is None else tensor.to(device)


def _as_bool(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """Bool tensors pass through; numbers are foreground above 0.5 (0/1 or soft labels)."""
    tensor = _as_tensor(x, device)
    return tensor if tensor.dtype == torch.bool else tensor > 0.5
