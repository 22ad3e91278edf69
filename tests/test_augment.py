"""The batched on-device augmentation agrees with the albumentations pipeline."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from mapnet_tune.data.augment import BatchAugment, _rot90, _shift_hue, build_augment


def _images(n=4, channels=3, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, channels, size, size), dtype=np.float32) * 0.8 + 0.1
    return x, (x[:, :1] > 0.5).astype(np.uint8)


def test_certain_flips_agree_exactly():
    x, y = _images()
    cpu = build_augment({"flip_p": 1.0}, channels=3, seed=0)
    gpu = BatchAugment({"flip_p": 1.0}, channels=3, seed=0)
    bx, by = gpu(torch.from_numpy(x), torch.from_numpy(y))
    for i in range(len(x)):
        ax, ay = cpu(x[i], y[i])
        np.testing.assert_array_equal(bx[i].numpy(), ax)
        np.testing.assert_array_equal(by[i].numpy(), ay)


def test_rotations_are_albumentations_rotations():
    x, _ = _images(n=1)
    for k in range(4):
        ref = A.RandomRotate90(p=1.0)
        out = ref.apply(x[0].transpose(1, 2, 0), factor=k).transpose(2, 0, 1)
        got = _rot90(torch.from_numpy(x), torch.tensor([k]))[0].numpy()
        np.testing.assert_array_equal(got, out)


@pytest.mark.parametrize("shift", [-15.0, 5.0, 20.0])
def test_hue_shift_matches_albumentations_up_to_uint8_rounding(shift):
    x, _ = _images(n=1)
    ref = A.HueSaturationValue(
        hue_shift_limit=(shift, shift), sat_shift_limit=0, val_shift_limit=0, p=1.0
    )
    want = ref(image=x[0].transpose(1, 2, 0))["image"].transpose(2, 0, 1)
    got = _shift_hue(torch.from_numpy(x), torch.tensor([shift * 2]))[0].numpy()
    assert np.abs(got - want).mean() < 0.005 and np.abs(got - want).max() < 0.03


def test_brightness_contrast_formula_matches_albumentations():
    x, _ = _images(n=1)
    x = x * 0.6  # stay inside [0, 1] so clipping does not hide a difference
    ref = A.RandomBrightnessContrast(brightness_limit=(0.1, 0.1), contrast_limit=(0.2, 0.2), p=1.0)
    want = ref(image=x[0].transpose(1, 2, 0))["image"].transpose(2, 0, 1)
    np.testing.assert_allclose(x[0] * 1.2 + 0.1, want, atol=1e-6)


def _stays(hflip: bool, vflip: bool, k: int) -> bool:
    """Does the top-left pixel stay put under these albumentations-style operations?"""
    a = np.zeros((4, 4))
    a[0, 0] = 1
    a = a[:, ::-1] if hflip else a
    a = a[::-1] if vflip else a
    return bool(np.rot90(a, k)[0, 0])


def test_batched_draws_follow_the_same_distribution():
    n, flip_p, rot_p, bright = 4000, 0.3, 0.4, 0.2
    x = torch.full((n, 3, 4, 4), 0.5)
    x[:, :, 0, 0] = 0.9  # a marker pixel reveals the flips and rotations
    y = (x[:, :1] > 0.7).float()
    out, mask = BatchAugment(
        {"flip_p": flip_p, "rot90_p": rot_p, "brightness": bright}, channels=3, seed=1
    )(x, y)
    marker = out[:, 0].flatten(1).argmax(1)
    assert torch.equal(marker, mask[:, 0].flatten(1).argmax(1))  # the mask moved with it
    p_flip = {True: flip_p, False: 1 - flip_p}
    p_k = {0: 1 - rot_p + rot_p / 4, 1: rot_p / 4, 2: rot_p / 4, 3: rot_p / 4}
    p_stay = sum(
        p_flip[h] * p_flip[v] * p_k[k] * _stays(h, v, k)
        for h in (True, False)
        for v in (True, False)
        for k in range(4)
    )
    assert (marker == 0).float().mean().item() == pytest.approx(p_stay, abs=0.03)
    offset = out[:, 1, 1, 1] - 0.5  # the brightness shift of each sample (no contrast)
    changed = offset.abs() > 1e-6
    assert changed.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert offset[changed].abs().max() <= bright + 1e-6
    assert offset[changed].mean().item() == pytest.approx(0.0, abs=0.02)
    assert offset[changed].abs().mean().item() == pytest.approx(bright / 2, abs=0.01)


def test_training_batches_use_the_batched_path_on_the_device():
    from mapnet_tune import engine
    from mapnet_tune.data import Split
    from mapnet_tune.data.augment import augmentation_for

    params = {"flip_p": 1.0}
    cpu = torch.device("cpu")
    assert augmentation_for({"flip_p": 0.0}, 1, 0, cpu) is None
    assert not isinstance(augmentation_for(params, 1, 0, cpu), BatchAugment)
    assert isinstance(augmentation_for(params, 1, 0, torch.device("cuda")), BatchAugment)
    x, y = _images(n=4, channels=1)
    split = Split(x, y, None, tuple("abcd"))
    batch = BatchAugment(params, channels=1, seed=0)
    ((bx, by, _),) = engine.Batches(split, 4, cpu, batch, seed=0).epoch()
    order = engine.Batches(split, 4, cpu, None, seed=0).epoch()
    ((px, py, _),) = order  # the same seeded order, unaugmented
    torch.testing.assert_close(bx, px.flip(-1).flip(-2))
    torch.testing.assert_close(by, py.flip(-1).flip(-2))
