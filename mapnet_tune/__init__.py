"""mapnet-tune: hyperparameter search and experiment tracking for MAP-Net."""

import os

# albumentations checks PyPI for updates on import unless told not to; runs must not touch
# the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
