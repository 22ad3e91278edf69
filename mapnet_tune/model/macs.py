"""Multiply-accumulate count by the spec's rule: convolutions and dense layers only."""

import torch
from torch import Tensor, nn


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Count the multiply-accumulates of one forward pass of ``model`` on ``x``.

    Forward hooks record every ``nn.Conv2d`` (``H_out * W_out * C_out * C_in/groups * k_h * k_w``)
    and ``nn.Linear`` (``in * out``) call of a real forward pass; BatchNorm, activations,
    pooling, resizing and element-wise operations are not counted. The pass runs in eval mode
    without gradients, so BatchNorm statistics are left untouched, and every module's mode is
    restored afterwards. A tensor on the ``meta`` device gives the count without computing.

    Args:
        model: Any module; MAP-Net gives 1,461,788,672 for a 1x1x64x64 input.
        x: Input batch.

    Returns:
        The MACs of the whole batch in ``x``.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        kernel_h, kernel_w = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w

    def linear_hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return total
