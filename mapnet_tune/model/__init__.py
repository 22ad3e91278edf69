"""MAP-Net in PyTorch, faithful to the official TensorFlow code, plus a MAC counter.

Example:
    >>> model = MAPNet(in_channels=1, out_channels=1)
    >>> logits = model(torch.zeros(2, 1, 64, 64))  # (2, 1, 64, 64), no sigmoid
"""

from mapnet_tune.model.macs import count_macs
from mapnet_tune.model.mapnet import MAPNet, check_input_size

__all__ = ["MAPNet", "check_input_size", "count_macs"]
