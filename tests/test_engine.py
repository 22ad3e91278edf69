"""The training loop: it learns the synthetic set, and mixed precision costs no accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mapnet_tune import engine
from mapnet_tune.data import Split, prepare
from mapnet_tune.data.augment import build_augment
from mapnet_tune.model import MAPNet


@pytest.mark.slow
def test_mapnet_learns_the_synthetic_set_on_the_cpu():
    data = prepare("synthetic", None, {"size": 64, "channels": 3, "seed": 0,
                                       "count": {"train": 96, "val": 16, "test": 16}})
    torch.manual_seed(0)
    model = MAPNet(3, 1, width=0.25, bn_momentum=0.1)
    settings = engine.TrainSettings(epochs=10, batch_size=8, lr=2e-3, pos_weight=2.0,
                                    eval_batch_size=16)
    result = engine.fit(model, data.splits["train"], data.splits["val"], settings,
                        device=torch.device("cpu"))
    val = data.splits["val"]
    chance_iou = float((val.masks * val.fov).sum() / val.fov.sum())  # "all vessel" in the FOV
    assert result.best_metrics["val/iou"] > 2 * chance_iou
    assert result.best_metrics["val/auc"] > 0.8
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    assert result.best_state is not None


def test_bf16_step_matches_fp32_step():
    torch.manual_seed(0)
    model = MAPNet(1, 1, width=0.125).train()
    x = torch.rand(4, 1, 64, 64)
    y = (torch.rand(4, 1, 64, 64) > 0.8).float()
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))
    fp32 = loss_fn(model(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = loss_fn(model(x).float(), y)
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 through the network.
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_training_batches_cover_patches_and_follow_the_seed():
    images = np.random.default_rng(0).random((2, 1, 40, 40), dtype=np.float32)
    masks = (images > 0.5).astype(np.uint8)
    coords = np.array([[0, 0, 0], [1, 8, 4], [0, 20, 20], [1, 0, 8]], np.int32)
    split = Split(images, masks, None, ("a", "b"), coords, 16)
    cpu = torch.device("cpu")
    first = list(engine.Batches(split, 2, cpu, None, seed=3).epoch())
    again = list(engine.Batches(split, 2, cpu, None, seed=3).epoch())
    assert len(first) == 2 and all(x.shape == (2, 1, 16, 16) for x, _ in first)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    cut = {tuple(np.round(x[0, 0, 0, :3].numpy(), 6)) for xs, _ in first for x in xs[:, None]}
    expected = {tuple(np.round(images[i, 0, top, left:left + 3], 6)) for i, top, left in coords}
    assert cut == expected
    for xs, ys in first:
        assert torch.equal(ys, (xs > 0.5).float())  # the mask patch matches the image patch


def test_augmentation_moves_image_and_mask_together():
    augment = build_augment({"flip_p": 0.5, "rot90_p": 0.5}, channels=1, seed=0)
    image = np.random.default_rng(0).random((1, 16, 16), dtype=np.float32)
    mask = (image > 0.5).astype(np.uint8)
    for _ in range(10):
        out_image, out_mask = augment(image, mask)
        assert out_image.shape == (1, 16, 16) and out_mask.shape == (1, 16, 16)
        np.testing.assert_array_equal(out_mask, (out_image > 0.5).astype(np.uint8))
    assert build_augment({"flip_p": 0.0}, channels=1, seed=0) is None
