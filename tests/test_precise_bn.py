"""Precise BatchNorm: the re-estimated statistics depend only on the weights and the batches,
and re-estimating them before validation leaves training untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mapnet_tune import engine
from mapnet_tune.config import parse_study
from mapnet_tune.data import prepare
from mapnet_tune.data.augment import BatchAugment
from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return prepare(
        "synthetic",
        None,
        {"size": 32, "channels": 1, "seed": 0, "count": {"train": 16, "val": 4, "test": 1}},
    )


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_recomputed_statistics_do_not_depend_on_the_old_ones(data):
    torch.manual_seed(0)
    fresh = MAPNet(1, 1, width=0.125, bn_momentum=0.01).eval()
    disturbed = MAPNet(1, 1, width=0.125, bn_momentum=0.01)
    disturbed.load_state_dict(fresh.state_dict())
    disturbed.eval()
    for m in _norms(disturbed):
        m.running_mean.add_(torch.randn_like(m.running_mean))
        m.running_var.mul_(3.0)
    val = data.splits["val"]
    whole = engine.Evaluation()
    before = [engine.evaluate(net, val, whole, device=CPU) for net in (fresh, disturbed)]
    assert before[0] != before[1]  # the disturbance shows in the metrics
    batches = list(engine.Batches(data.splits["train"], 4, CPU, None, seed=1).epoch())
    for net in (fresh, disturbed):
        assert engine.recompute_bn_stats(net, batches, steps=3, device=CPU) == 3
    after = [engine.evaluate(net, val, whole, device=CPU) for net in (fresh, disturbed)]
    assert after[0] == after[1]
    for a, b in zip(_norms(fresh), _norms(disturbed), strict=True):
        assert torch.equal(a.running_mean, b.running_mean)
        assert torch.equal(a.running_var, b.running_var)
        assert a.momentum == b.momentum == 0.01  # restored after the cumulative average
    assert not fresh.training and not disturbed.training  # the mode is restored


def test_recomputed_statistics_are_the_average_over_the_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=0.01)).train()
    xs = [torch.randn(4, 1, 32, 32) * (i + 1) + i for i in range(3)]
    # Third elements (e.g. a loss mask) and labels are ignored; only the first `steps` are used.
    batches = [(x, torch.zeros(1), None) for x in xs] + [(torch.full((4, 1, 32, 32), 1e3),)]
    assert engine.recompute_bn_stats(net, iter(batches), steps=3, device=CPU) == 3
    with torch.no_grad():
        feats = [net[0](x) for x in xs]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means)
    torch.testing.assert_close(net[1].running_var, variances)
    assert net.training


def test_recompute_refuses_an_empty_stream_before_touching_the_statistics():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.fill_(5.0)
    with pytest.raises(ValueError, match="no batches"):
        engine.recompute_bn_stats(nn.Sequential(nn.Conv2d(1, 2, 1), bn), [], steps=4)
    assert torch.all(bn.running_mean == 5.0)


def _fit(data, precise_bn_batches: int) -> tuple[nn.Module, engine.FitResult]:
    torch.manual_seed(0)
    model = MAPNet(1, 1, width=0.125, bn_momentum=0.01)
    settings = engine.TrainSettings(
        epochs=2,
        batch_size=4,
        lr=1e-3,
        evaluation=engine.Evaluation(batch_size=4),
        precise_bn_batches=precise_bn_batches,
    )
    augment = BatchAugment({"flip_p": 0.5, "rot90_p": 0.5, "brightness": 0.2}, 1, seed=0)
    result = engine.fit(
        model, data.splits["train"], data.splits["val"], settings, augment, device=CPU
    )
    return model, result


def test_precise_bn_leaves_the_training_stream_unchanged(data):
    plain, plain_result = _fit(data, 0)
    # 6 batches > the 4 of an epoch: the precise stream runs into its second epoch.
    precise, precise_result = _fit(data, 6)
    # Trained parameters (convolutions and BN affine weights) match; buffers need not.
    for (name, a), (_, b) in zip(plain.named_parameters(), precise.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [h["train/loss"] for h in plain_result.history] == [
        h["train/loss"] for h in precise_result.history
    ]
    assert not torch.equal(_norms(plain)[0].running_mean, _norms(precise)[0].running_mean)


def test_precise_bn_batches_is_read_and_validated():
    doc = {"dataset": {"name": "synthetic"}, "train": {"precise_bn_batches": 8}}
    assert parse_study(doc, "s.yaml").train.precise_bn_batches == 8
    assert parse_study({"dataset": {"name": "synthetic"}}, "s.yaml").train.precise_bn_batches == 0
    for bad, needle in (
        (-1, "must be 0 or more, got -1"),
        (2.5, "must be an integer"),
        (True, "must be an integer"),
    ):
        doc = {"dataset": {"name": "synthetic"}, "train": {"precise_bn_batches": bad}}
        with pytest.raises(UserError) as err:
            parse_study(doc, "bad.yaml")
        assert f"study file bad.yaml: key 'train.precise_bn_batches' {needle}" in str(err.value)
