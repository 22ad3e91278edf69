"""MAP-Net: counts, shapes, MACs, interpolation, size rules and training (spec section 12)."""

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mapnet_tune.model import MAPNet, check_input_size, count_macs
from mapnet_tune.model.layers import (
    SameConv2d,
    legacy_resize_bilinear,
    resize_bilinear,
    tf_same_padding,
    upsample_nearest,
)

# The four max-pool branches of the head, windows 2, 3, 5 and 6 (spec 3.7).
POOL_MODULES = [f"head.pooling.pools.{i}" for i in range(4)]


@pytest.fixture(scope="module")
def rgb_model() -> MAPNet:
    torch.manual_seed(0)
    return MAPNet(in_channels=3).eval()


@pytest.fixture(scope="module")
def grey_model() -> MAPNet:
    torch.manual_seed(0)
    return MAPNet(in_channels=1).eval()


def _shapes(value: Tensor | list[Tensor] | tuple[Tensor, ...]) -> tuple | list:
    if isinstance(value, Tensor):
        return tuple(value.shape)
    return [tuple(v.shape) for v in value]


def _record(model: nn.Module, names: list[str], x: Tensor) -> dict[str, tuple]:
    """Run ``model`` on ``x`` and return ``{name: (input shapes, output shapes)}``."""
    seen: dict[str, tuple] = {}
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple, output: Tensor | list[Tensor]) -> None:
            seen[name] = (_shapes(inputs[0]), _shapes(output))

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ---------------------------------------------------------------------------- counts (spec 8)


@pytest.mark.parametrize(("in_channels", "expected"), [(3, 24_001_184), (1, 24_000_032)])
def test_parameter_count(rgb_model: MAPNet, grey_model: MAPNet, in_channels, expected):
    model = rgb_model if in_channels == 3 else grey_model
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    running = sum(b.numel() for name, b in model.named_buffers() if "running_" in name)
    assert running == 43_072


def test_layer_counts(rgb_model: MAPNet):
    convs = [m for m in rgb_model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in rgb_model.modules() if isinstance(m, nn.BatchNorm2d)]
    dense = [m for m in rgb_model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 149 and all(m.bias is None for m in convs)
    assert len(norms) == 149 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    assert [(m.in_features, m.out_features) for m in dense] == [(448, 448), (448, 448)]
    assert all(m.bias is not None for m in dense)


def test_initialisation(rgb_model: MAPNet):
    conv = rgb_model.head.fuse.conv  # 1x1, 2368 -> 128: many weights, tight estimate
    std = math.sqrt(1 / 2368) / 0.87962566103423978
    assert conv.weight.abs().max() <= 2 * std
    assert conv.weight.std().item() == pytest.approx(std * 0.87962566103423978, rel=0.02)
    limit = math.sqrt(6 / (448 + 448))
    for dense in (rgb_model.head.attention.fc1, rgb_model.head.attention.fc2):
        assert dense.weight.abs().max() <= limit
        assert dense.weight.abs().max() > 0.9 * limit
        assert torch.count_nonzero(dense.bias) == 0
    norm = rgb_model.stem.conv1.bn
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_width_scales_every_channel_count():
    model = MAPNet(in_channels=3, width=0.125)
    # Paths 8/16/32, attention over 16 + 32 + 8, pooling 5 x (16 + 32), head 16/8/4.
    assert model.head.attention.fc1.in_features == 56
    assert model.head.fuse.conv.in_channels == 5 * 48 + 56
    assert model.head.fuse.conv.out_channels == 16
    assert model.head.up1.conv.conv.out_channels == 8
    assert model.head.up2.conv.conv.out_channels == 4
    assert model.stage1[0].conv3.conv.out_channels == 32
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 149


def test_config_rebuilds_the_model():
    model = MAPNet(in_channels=3, out_channels=2, width=0.125, head_interpolation="pytorch")
    assert model.config == {
        "in_channels": 3,
        "out_channels": 2,
        "width": 0.125,
        "head_interpolation": "pytorch",
        "bn_eps": 1e-3,
        "bn_momentum": 0.01,
    }
    MAPNet(**model.config).load_state_dict(model.state_dict(), strict=True)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'legacy', 'pytorch'"):
        MAPNet(head_interpolation="bicubic")
    with pytest.raises(ValueError, match="width"):
        MAPNet(width=0.0)
    with pytest.raises(ValueError, match="in_channels"):
        MAPNet(in_channels=0)


# ----------------------------------------------------------------------------- shapes (spec 7)


def test_shape_table_256(rgb_model: MAPNet):
    p0, p1, p2 = (1, 64, 64, 64), (1, 128, 32, 32), (1, 256, 16, 16)
    expected = {
        "stem.conv1": ((1, 3, 256, 256), (1, 64, 128, 128)),
        "stem.conv2": ((1, 64, 128, 128), (1, 64, 128, 128)),
        "stem.conv3": ((1, 64, 128, 128), (1, 64, 128, 128)),
        "stem.pool": ((1, 64, 128, 128), (1, 64, 64, 64)),
        "stage1.0": ((1, 64, 64, 64), (1, 256, 64, 64)),
        "stage1.1": ((1, 256, 64, 64), (1, 256, 64, 64)),
        "stage1.2": ((1, 256, 64, 64), (1, 256, 64, 64)),
        "stage1.3": ((1, 256, 64, 64), (1, 256, 64, 64)),
        "transition1": ([(1, 256, 64, 64)], [p0, p1]),
        "stage2.0": ([p0, p1], [p0, p1]),
        "stage2.1": ([p0, p1], [p0, p1]),
        "transition2": ([p0, p1], [p0, p1, p2]),
        "stage3.0": ([p0, p1, p2], [p0, p1, p2]),
        "stage3.1": ([p0, p1, p2], [p0, p1, p2]),
        "stage3.2": ([p0, p1, p2], [(1, 128, 64, 64), (1, 256, 64, 64), (1, 64, 64, 64)]),
        "head.attention": ((1, 448, 64, 64), (1, 448, 64, 64)),
        "head.pooling": ((1, 384, 64, 64), (1, 1920, 64, 64)),
        "head.fuse": ((1, 2368, 64, 64), (1, 128, 64, 64)),
        "head.up1": ((1, 128, 64, 64), (1, 64, 128, 128)),
        "head.up2": ((1, 64, 128, 128), (1, 32, 256, 256)),
        "head.classifier": ((1, 32, 256, 256), (1, 1, 256, 256)),
    }
    for name, size in zip(POOL_MODULES, (32, 21, 12, 10), strict=True):
        expected[name] = ((1, 384, 64, 64), (1, 384, size, size))
    seen = _record(rgb_model, list(expected), torch.randn(1, 3, 256, 256))
    assert seen == expected


def test_shapes_64(grey_model: MAPNet):
    names = ["stem", "transition2", "head.classifier", *POOL_MODULES]
    seen = _record(grey_model, names, torch.randn(1, 1, 64, 64))
    assert seen["stem"][1] == (1, 64, 16, 16)
    assert seen["transition2"][1] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]
    assert [seen[name][1][-1] for name in POOL_MODULES] == [8, 5, 3, 2]
    assert seen["head.classifier"][1] == (1, 1, 64, 64)


def test_shapes_512():
    model = MAPNet(in_channels=1, width=0.25).eval()
    seen = _record(model, ["head.classifier", *POOL_MODULES], torch.randn(1, 1, 512, 512))
    assert [seen[name][1][-1] for name in POOL_MODULES] == [64, 42, 25, 21]
    assert seen["head.classifier"][1] == (1, 1, 512, 512)


# ------------------------------------------------------------------------------- MACs (spec 9)


def test_macs_64(grey_model: MAPNet):
    assert count_macs(grey_model, torch.zeros(1, 1, 64, 64)) == 1_461_788_672


def test_macs_256(rgb_model: MAPNet):
    assert count_macs(rgb_model, torch.zeros(1, 3, 256, 256)) == 23_401_472_000


def test_count_macs_leaves_the_model_untouched():
    model = MAPNet(width=0.125).train()
    model.head.train(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = count_macs(model, torch.randn(2, 1, 32, 32))
    assert macs > 0
    assert model.training and model.stem.training and not model.head.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_count_macs_on_meta_device():
    with torch.device("meta"):
        model = MAPNet(in_channels=1)
    macs = count_macs(model, torch.zeros(1, 1, 512, 512, device="meta"))
    assert macs == 93_529_186_304


# -------------------------------------------------------------------- interpolation (spec 1.2)


def test_legacy_bilinear_doubles_a_ramp():
    ramp = torch.arange(4.0).view(1, 1, 1, 4)
    out = legacy_resize_bilinear(ramp, (1, 8))
    assert out.flatten().tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]


def test_nearest_doubles_a_ramp():
    ramp = torch.arange(4.0).view(1, 1, 1, 4)
    assert upsample_nearest(ramp, 2)[0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_legacy_bilinear_non_integer_factor_by_hand():
    # m[i, j] = 10 i + j is linear, so the blend equals the source coordinate
    # s = d * 5 / 16 = 0.3125 d, clamped at 4 once the next row would fall off the map.
    grid = torch.arange(5.0)
    image = (10 * grid[:, None] + grid[None, :]).view(1, 1, 5, 5)
    coord = torch.clamp(torch.arange(16.0) * 0.3125, max=4.0)
    expected = 10 * coord[:, None] + coord[None, :]
    out = legacy_resize_bilinear(image, (16, 16))[0, 0]
    torch.testing.assert_close(out, expected)
    # Spot values: d = 3 reads s = 0.9375 (rows 0 and 1), d = 13 reads s = 4.0625 (row 4 only).
    assert out[3, 0].item() == pytest.approx(9.375)
    assert out[13, 13].item() == pytest.approx(44.0)


def test_legacy_bilinear_matches_a_loop_for_arbitrary_sizes():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 5, 21)
    out = legacy_resize_bilinear(image, (16, 64))

    def weights(n_in: int, n_out: int) -> Tensor:
        matrix = torch.zeros(n_out, n_in)
        for d in range(n_out):
            s = d * n_in / n_out
            i0 = math.floor(s)
            i1 = min(i0 + 1, n_in - 1)
            matrix[d, i0] += 1 - (s - i0)
            matrix[d, i1] += s - i0
        return matrix

    expected = weights(5, 16) @ image @ weights(21, 64).T
    torch.testing.assert_close(out, expected)


def test_resize_keeps_layout_and_dtype():
    image = torch.randn(2, 4, 10, 10).to(torch.bfloat16, memory_format=torch.channels_last)
    out = legacy_resize_bilinear(image, (64, 64))
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, legacy_resize_bilinear(image.contiguous(), (64, 64)))


def test_pytorch_interpolation_uses_half_pixel_centres():
    ramp = torch.arange(4.0).view(1, 1, 1, 4)
    out = resize_bilinear(ramp, (1, 8), "pytorch")
    torch.testing.assert_close(out, F.interpolate(ramp, size=(1, 8), mode="bilinear"))
    assert out.flatten().tolist() != [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
    model = MAPNet(width=0.125, head_interpolation="pytorch").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


# --------------------------------------------------------------------------- padding (spec 1.1)


def test_tf_same_padding():
    assert tf_same_padding(64, 3, 2) == (0, 1)
    assert tf_same_padding(65, 3, 2) == (1, 1)
    assert tf_same_padding(64, 3, 1) == (1, 1)
    assert tf_same_padding(64, 1, 1) == (0, 0)


def test_stride_two_conv_samples_the_tf_grid():
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 8, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape == (1, 3, 4, 3)


# ------------------------------------------------------------------------ input sizes (spec 6)


@pytest.mark.parametrize(("height", "width"), [(72, 100), (16, 16), (48, 40)])
def test_unsupported_sizes_are_rejected(height, width):
    with pytest.raises(ValueError, match=f"{height}x{width}") as info:
        check_input_size(height, width)
    message = str(info.value)
    assert "multiples of 16" in message and "at least 32" in message
    assert "forward_padded" in message
    with pytest.raises(ValueError, match="multiples of 16"):
        MAPNet(width=0.125)(torch.zeros(1, 1, height, width))


def test_error_names_the_padded_size():
    with pytest.raises(ValueError, match="pad it to 80x112"):
        check_input_size(72, 100)


@pytest.mark.parametrize(("height", "width"), [(32, 48), (80, 96)])
def test_supported_sizes_run(height, width):
    check_input_size(height, width)
    model = MAPNet(width=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, height, width)).shape == (1, 1, height, width)


@pytest.mark.parametrize(("height", "width"), [(584, 565), (20, 3), (1, 1)])
def test_forward_padded_crops_back(height, width):
    torch.manual_seed(0)
    model = MAPNet(width=0.125).eval()
    with torch.no_grad():
        assert model.forward_padded(torch.rand(1, 1, height, width)).shape == (
            1,
            1,
            height,
            width,
        )


def test_forward_padded_is_plain_forward_on_supported_sizes():
    model = MAPNet(width=0.125).eval()
    x = torch.randn(1, 1, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_padded(x), model(x))


# ---------------------------------------------------------------------------------- training


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = MAPNet(width=0.25).train()
    x = torch.rand(4, 1, 32, 32)
    y = (x > 0.5).float()
    loss_fn = nn.BCEWithLogitsLoss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.95 * losses[0]
    assert final < min(losses[:3])


def test_channels_last_bf16_autocast():
    torch.manual_seed(0)
    model = MAPNet(in_channels=3, width=0.125).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 1, 64, 64)
    assert torch.isfinite(logits.float()).all()
    logits.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
