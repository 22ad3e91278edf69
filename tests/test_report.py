"""`mapnet-tune report`: the champion next to the published tables, the plots, the ROC."""

from __future__ import annotations

import os

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from mapnet_tune.metrics import MetricAccumulator
from mapnet_tune.report import comparison_table, published


@pytest.mark.slow
def test_report_writes_the_table_and_the_plots(registry, cli):
    result = cli("report", "--study", "tiny", "--out", registry / "rep")
    assert result.exit_code == 0, result.output
    text = (registry / "rep" / "report.md").read_text()
    assert "| **MAP-Net, mapnet-tune: mapnet-synthetic v" in text
    assert (
        "trained on 32x32 whole images; test scored with full-image, threshold 0.5 (fixed at"
        in text
    )
    assert "as in the published rows); chosen by val/iou" in text
    assert "no published results ship for it" in text and "## Best trials" in text
    plots = [
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "roc.png",
    ]
    for name in plots:
        assert f"![{name}]({name})" in text
        with Image.open(registry / "rep" / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment], "tags.`mapnet_tune.role` = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert logged == {f"report/{name}" for name in ["report.md", *plots]}


@pytest.mark.slow
def test_report_on_a_study_without_completed_trials(registry, cli):
    optuna.create_study(study_name="empty", storage="sqlite:///optuna.db")
    result = cli("report", "--study", "empty")
    assert result.exit_code == 2 and "has no completed trial" in result.output


def test_published_tables_ship_with_their_caveats():
    drive, isic, lung = (published(name) for name in ("drive", "isic", "lung"))
    assert published("synthetic") is None
    assert len(drive.rows) == 11 and "continuous ROC-AUC" in drive.caveats[0]
    assert any("pixel accuracy" in c for c in isic.caveats)
    assert any("PC 0.935 is really the thresholded AUC" in c for c in isic.caveats)
    assert any("leaks ground truth" in c for c in lung.caveats)
    ours = {
        "test/f1": 0.8,
        "test/sensitivity": 0.7,
        "test/specificity": 0.98,
        "test/accuracy": 0.95,
        "test/auc": 0.97,
        "test/iou": 0.66,
        "test/iou_per_image": 0.65,
        "test/legacy_js": 0.95,
        "test/legacy_auc_binary": 0.84,
    }
    table = comparison_table(drive, [("ours", ours)], "test").splitlines()
    assert table[0] == "| method | F1 | Sens | Spec | Acc | AUC | IoU | IoU/img |"
    assert "| BCDU-Net (2019) | 0.8222 | 0.8012 | 0.9784 | 0.9559 | 0.9788 | 0.6981* | - |" in table
    assert (
        table[-1] == "| **ours** | 0.8000 | 0.7000 | 0.9800 | 0.9500 | 0.9700 | 0.6600 | 0.6500 |"
    )
    lung_table = comparison_table(lung, [("ours", ours)], "test").splitlines()
    # The lung AUC column is the thresholded one, so ours shows its thresholded AUC there and
    # its continuous ROC-AUC in a column of its own.
    assert lung_table[0].endswith("| AUC (bin) | JS (=Acc) | ROC-AUC | IoU | IoU/img |")
    assert lung_table[-1].endswith("| 0.8400 | 0.9500 | 0.9700 | 0.6600 | 0.6500 |")


def test_roc_points_match_sklearn():
    rng = np.random.default_rng(0)
    target = rng.random((4, 1, 16, 16)) < 0.3
    probs = np.clip(target * 0.3 + rng.random(target.shape) * 0.7, 0, 1).astype(np.float32)
    acc = MetricAccumulator(bins=1000)
    acc.update(torch.from_numpy(probs), torch.from_numpy(target))
    fpr, tpr = acc.roc(max_points=None)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(acc.auc(), abs=1e-9)
    assert acc.auc() == pytest.approx(roc_auc_score(target.ravel(), probs.ravel()), abs=2e-3)
    sk_fpr, sk_tpr, _ = roc_curve(target.ravel(), probs.ravel())
    assert np.interp(0.2, fpr, tpr) == pytest.approx(np.interp(0.2, sk_fpr, sk_tpr), abs=0.02)
    thinned = acc.roc(max_points=50)
    assert len(thinned[0]) <= 50 and thinned[0][-1] == 1
