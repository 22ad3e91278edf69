"""The training loop: it learns the synthetic set, and mixed precision costs no accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mapnet_tune import engine
from mapnet_tune.data import Split, prepare
from mapnet_tune.data.augment import BatchAugment, build_augment
from mapnet_tune.model import MAPNet


@pytest.mark.slow
def test_mapnet_learns_the_synthetic_set_on_the_cpu():
    data = prepare(
        "synthetic",
        None,
        {"size": 64, "channels": 3, "seed": 0, "count": {"train": 96, "val": 16, "test": 16}},
    )
    torch.manual_seed(0)
    model = MAPNet(3, 1, width=0.25, bn_momentum=0.1)
    settings = engine.TrainSettings(
        epochs=10,
        batch_size=8,
        lr=2e-3,
        pos_weight=2.0,
        evaluation=engine.Evaluation(batch_size=16),
    )
    result = engine.fit(
        model, data.splits["train"], data.splits["val"], settings, device=torch.device("cpu")
    )
    val = data.splits["val"]
    chance_iou = float((val.masks * val.fov).sum() / val.fov.sum())  # "all vessel" in the FOV
    assert result.best_metrics["val/iou"] > 2 * chance_iou
    assert result.best_metrics["val/auc"] > 0.8
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


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
    assert len(first) == 2 and all(x.shape == (2, 1, 16, 16) for x, _, _ in first)
    # Patches train on every pixel, as the official recipe does.
    assert all(valid is None for _, _, valid in first)
    for (xa, ya, _), (xb, yb, _) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    cut = {tuple(np.round(x[0, 0, 0, :3].numpy(), 6)) for xs, _, _ in first for x in xs[:, None]}
    expected = {tuple(np.round(images[i, 0, top, left : left + 3], 6)) for i, top, left in coords}
    assert cut == expected
    for xs, ys, _ in first:
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


@pytest.mark.parametrize("augment", ["albumentations", "batch"])
def test_whole_images_pad_to_a_square_and_the_loss_mask_follows_the_augmentation(augment):
    # 40x37 images with a FOV: padded to 48x48, valid = the real pixels inside the FOV; the
    # mask and the valid pixels move with the image through flips and rotations.
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, 40, 37), dtype=np.float32) * 0.8 + 0.2  # never 0 inside
    masks = (images > 0.6).astype(np.uint8)
    fov = np.zeros((4, 1, 40, 37), np.uint8)
    fov[..., 2:38, 2:35] = 1
    split = Split(images, masks, fov, ("a", "b", "c", "d"))
    params = {"flip_p": 0.5, "rot90_p": 1.0}
    aug = (
        build_augment(params, 1, seed=0)
        if augment == "albumentations"
        else BatchAugment(params, 1, seed=0)
    )
    cpu = torch.device("cpu")
    assert engine.padded_side(40, 37) == 48 and engine.padded_side(16, 8) == 32
    seen = 0
    for _ in range(3):
        for x, y, valid in engine.Batches(split, 2, cpu, aug, seed=1).epoch():
            assert x.shape == y.shape == valid.shape == (2, 1, 48, 48)
            real = x > 0  # padding is zero, every real pixel is at least 0.2
            assert torch.equal(y, ((x > 0.6) & real).float())
            assert valid.sum() == 2 * 36 * 33
            assert torch.all(valid <= real.float())
            seen += 1
    assert seen == 6


def test_the_loss_counts_only_valid_pixels():
    # A model whose logits are wrong outside the FOV and right inside trains on zero loss
    # only if the loss ignores what lies outside; pos_weight 1 and logits +-20 make the
    # inside loss ~0.
    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return (x[:, :1] > 0.5).float() * 40 - 20 + self.w * 0

    images = np.zeros((2, 1, 32, 32), np.float32)
    images[..., 8:24, 8:24] = 1.0
    fov = np.zeros((2, 1, 32, 32), np.uint8)
    fov[..., 8:24, 8:24] = 1
    masks = np.zeros((2, 1, 32, 32), np.uint8)
    masks[..., 8:24, 8:24] = 1
    masks[..., 0, 0] = 1  # outside the FOV: a wrong prediction there must not count
    split = Split(images, masks, fov, ("a", "b"))
    settings = engine.TrainSettings(epochs=1, batch_size=2, lr=0.0)
    result = engine.fit(Oracle(), split, None, settings, device=torch.device("cpu"))
    assert result.history[0]["train/loss"] < 1e-6


def test_validation_every_few_epochs_and_always_after_the_last():
    data = prepare("synthetic", None, {"size": 32, "count": {"train": 8, "val": 4, "test": 4}})
    torch.manual_seed(0)
    settings = engine.TrainSettings(epochs=5, batch_size=4, lr=1e-3, val_every=2)
    result = engine.fit(
        MAPNet(1, 1, width=0.0625),
        data.splits["train"],
        data.splits["val"],
        settings,
        device=torch.device("cpu"),
    )
    validated = [epoch for epoch, m in enumerate(result.history) if "val/iou" in m]
    assert validated == [1, 3, 4]
    assert result.best_epoch in validated
