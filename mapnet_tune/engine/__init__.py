"""Training, evaluation and inference for MAP-Net. Knows nothing of Optuna or MLflow.

Callers hear about progress through the ``on_epoch`` and ``on_step`` callbacks of :func:`fit`;
whatever they raise (for example a pruning signal) ends training and propagates unchanged.

- ``device``: device choice, autocast, memory format, padding to valid sizes.
- ``train``: seeded batches, the fit loop, precise BatchNorm.
- ``infer``: the evaluation protocols, prediction and pooled metrics.
"""

from mapnet_tune.engine.device import (
    clone_model,
    padded_side,
    pick_device,
    prepare_model,
)
from mapnet_tune.engine.infer import Evaluation, evaluate, predict
from mapnet_tune.engine.train import (
    Batches,
    EpochCallback,
    FitResult,
    StepCallback,
    TrainSettings,
    fit,
    precise_bn_stream,
    recompute_bn_stats,
)

__all__ = [
    "Batches",
    "EpochCallback",
    "Evaluation",
    "FitResult",
    "StepCallback",
    "TrainSettings",
    "clone_model",
    "evaluate",
    "fit",
    "padded_side",
    "pick_device",
    "precise_bn_stream",
    "predict",
    "prepare_model",
    "recompute_bn_stats",
]
