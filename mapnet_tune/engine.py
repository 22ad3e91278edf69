"""Training, evaluation and inference for MAP-Net. Knows nothing of Optuna or MLflow.

Callers hear about progress through the ``on_epoch`` callback of :func:`fit`; whatever it
raises (for example a pruning signal) ends training and propagates unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mapnet_tune.data import Split
from mapnet_tune.data.augment import Augment, BatchAugment
from mapnet_tune.metrics import (
    Confusion,
    MetricAccumulator,
    legacy_lung_confusion,
    legacy_lung_metrics,
)

EpochCallback = Callable[[int, dict[str, float], nn.Module, bool], None]


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Protocols :func:`evaluate` knows: the split's patch coordinates (DRIVE's validation patches),
#: whole images, or the published sliding window.
PROTOCOLS = ("patches", "full-image", "sliding-window")


@dataclass(frozen=True)
class Evaluation:
    """How a model is scored and used: the one place that holds the window and the stride.

    Attributes:
        protocol: One of :data:`PROTOCOLS`.
        window: Sliding-window side (the training patch side of the model).
        stride: Sliding-window step; the published DRIVE numbers use 5.
        batch_size: Images (full-image) or windows/patches per forward pass.
        threshold: Probability at and above which a pixel is foreground.
    """

    protocol: str = "full-image"
    window: int = 64
    stride: int = 16
    batch_size: int = 16
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{self.protocol}'; use one of "
                             f"{', '.join(PROTOCOLS)}")

    def describe(self) -> str:
        """``sliding-window 256 px, stride 64`` or ``full-image``: for tables and cards."""
        if self.protocol == "sliding-window":
            return f"sliding-window {self.window} px, stride {self.stride}"
        return self.protocol


@dataclass(frozen=True)
class TrainSettings:
    """What one training run needs besides the model and the data.

    ``batch_size`` is the optimiser's batch: one Adam step per ``batch_size`` samples.
    ``amp`` runs training and validation under bf16 autocast on CUDA (see :func:`autocast`);
    False gives an fp32 reference to check that bf16 costs no accuracy.
    ``precise_bn_batches`` > 0 re-estimates the BatchNorm running statistics over that many
    un-augmented training batches before each validation and once more after the last epoch
    (see :func:`recompute_bn_stats`), so a model trained without validation ends with the
    same kind of statistics as one that was validated.
    ``val_every`` validates every that many epochs; the last epoch is always validated.
    """

    epochs: int
    batch_size: int
    lr: float
    pos_weight: float = 1.0
    max_seconds: float | None = None
    steps_per_epoch: int | None = None
    evaluation: Evaluation = Evaluation()
    val_every: int = 1
    objective: str = "val/iou"
    maximize: bool = True
    seed: int = 0
    amp: bool = True
    precise_bn_batches: int = 0


@dataclass
class FitResult:
    """What :func:`fit` hands back: per-epoch history and the best validated epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples_seen: int = 0


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (same accuracy, several times the speed); nothing elsewhere.

    ``enabled=False`` (``TrainSettings.amp``) gives the fp32 reference on CUDA too.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model to ``device``; channels_last on CUDA, where cuDNN is faster with it."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        # Trials train on a few fixed input shapes: cuDNN's autotuner pays back at once.
        torch.backends.cudnn.benchmark = True
    return model


def _gather_patches(images: torch.Tensor, coords: torch.Tensor, size: int) -> torch.Tensor:
    """Cut (image, top, left) patches of ``size`` from ``images`` (N, C, H, W) in one gather."""
    offsets = torch.arange(size, device=images.device)
    rows = (coords[:, 1:2] + offsets)[:, :, None]  # (B, size, 1)
    cols = (coords[:, 2:3] + offsets)[:, None, :]  # (B, 1, size)
    idx = coords[:, 0][:, None, None]
    return images.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)


def padded_side(height: int, width: int) -> int:
    """The square side a whole image is padded to: a multiple of 16, at least 32.

    Square, so that 90-degree rotations keep a batch's shape; used by training on whole
    images and by full-image prediction alike, so the model sees the same borders in both.
    """
    return max(32, -(-max(height, width) // 16) * 16)


def _pad_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """Zero-pad (..., H, W) at the bottom and right to (..., side, side)."""
    return F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))


class Batches:
    """Seeded training batches from a split: its patches if it has them, else whole images.

    Each batch is ``(x, y, valid)``. ``valid`` is None for patches (the official recipe trains
    on every patch pixel). Whole images are zero-padded to a square of :func:`padded_side`,
    and ``valid`` (B, 1, S, S) then marks the real pixels, inside the FOV when the split has
    one, so that the loss counts only the pixels the protocol scores; it goes through the
    same flips and rotations as the mask.

    Without augmentation, or with a :class:`BatchAugment`, the arrays live on the device and
    batches are gathered and augmented there; per-sample albumentations needs the CPU.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device,
                 augment: Augment | BatchAugment | None, seed: int) -> None:
        self.split = split
        self.batch_size = batch_size
        self.device = device
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        per_sample = augment is not None and not isinstance(augment, BatchAugment)
        home = torch.device("cpu") if per_sample else device
        self.images = torch.from_numpy(split.images).to(home)
        self.masks = torch.from_numpy(split.masks).to(home)
        self.valid: torch.Tensor | None = None
        if split.patches is None:
            _, _, height, width = split.images.shape
            side = padded_side(height, width)
            if split.fov is not None or (height, width) != (side, side):
                valid = (torch.from_numpy(split.fov).to(home) if split.fov is not None
                         else torch.ones_like(self.masks))
                self.images, self.masks, self.valid = (
                    _pad_square(t, side) for t in (self.images, self.masks, valid))
        self.coords = (torch.from_numpy(split.patches.astype(np.int64)).to(home)
                       if split.patches is not None else None)
        self.count = len(split.patches) if split.patches is not None else len(split.images)
        if self.count < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the {self.count} training "
                             f"samples; choose a batch size of at most {self.count}")

    def __len__(self) -> int:
        """Batches per epoch; the last incomplete batch is dropped, as the official loop does."""
        return self.count // self.batch_size

    def epoch(self, limit: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """One epoch of (x, y, valid) float batches on the device, in a fresh random order."""
        order = torch.from_numpy(self.rng.permutation(self.count)).to(self.images.device)
        steps = len(self) if limit is None else min(limit, len(self))
        for step in range(steps):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            if self.coords is not None:
                coords = self.coords[idx]
                size = self.split.patch_size
                x = _gather_patches(self.images, coords, size)
                y = _gather_patches(self.masks, coords, size)
            else:
                x, y = self.images[idx], self.masks[idx]
            # The valid mask rides along as a second mask channel through the augmentation.
            if self.valid is not None:
                y = torch.cat([y, self.valid[idx]], 1)
            if isinstance(self.augment, BatchAugment):
                x, y = self.augment(x.float(), y.float())
            elif self.augment is not None:
                pairs = [self.augment(xi.numpy(), yi.numpy()) for xi, yi in zip(x, y, strict=True)]
                x = torch.from_numpy(np.stack([p[0] for p in pairs]))
                y = torch.from_numpy(np.stack([p[1] for p in pairs]))
            x = x.to(self.device, non_blocking=True).float()
            y = y.to(self.device, non_blocking=True).float()
            if self.valid is None:
                yield x, y, None
            else:
                yield x, y[:, :1], y[:, 1:]


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits for any input size: straight through when the size is valid, else pad-and-crop."""
    h, w = x.shape[-2:]
    if h % 16 == 0 and w % 16 == 0 and min(h, w) >= 32:
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return model(x)
    return model.forward_padded(x)


def fit(model: nn.Module, train: Split, val: Split | None, settings: TrainSettings,
        augment: Augment | BatchAugment | None = None, on_epoch: EpochCallback | None = None,
        device: torch.device | None = None) -> FitResult:
    """Train with Adam and the weighted BCE, validating after every epoch.

    Args:
        model: A MAP-Net (or any module returning logits of the input's size).
        train: Training split (patches or whole images).
        val: Validation split, scored with ``settings.evaluation`` every
            ``settings.val_every`` epochs and after the last; None trains without validation.
            Either way the model ends holding the final weights: which epoch was best is
            reported, not restored.
        settings: Hyperparameters and budget.
        augment: Optional augmentation: per sample (albumentations, on the CPU) or a
            :class:`BatchAugment` (whole batches on the training device).
        on_epoch: Called as ``on_epoch(epoch, metrics, model, improved)`` after each
            validation, ``improved`` telling whether this epoch is the best so far; may raise
            to stop training (the exception propagates).
        device: Where to train; default :func:`pick_device`.

    Returns:
        The history and the best validated epoch by ``settings.objective``.
    """
    device = device or pick_device()
    torch.manual_seed(settings.seed)
    model = prepare_model(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr,
                                 fused=device.type == "cuda")
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([settings.pos_weight], device=device),
                                   reduction="none")
    batches = Batches(train, settings.batch_size, device, augment, settings.seed)
    bn_batches = (precise_bn_stream(train, settings, device)
                  if settings.precise_bn_batches > 0 else None)
    result = FitResult()
    start = time.perf_counter()
    refreshed = -1  # the epoch after which BatchNorm statistics were last re-estimated
    for epoch in range(settings.epochs):
        model.train()
        total, steps = torch.zeros((), device=device), 0
        for x, y, valid in batches.epoch(settings.steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, settings.amp):
                logits = _forward(model, x).float()
            loss = _masked_mean(loss_fn(logits, y), valid)
            loss.backward()
            optimizer.step()
            # Accumulating on the device avoids a host sync per step.
            total += loss.detach()
            steps += 1
            result.samples_seen += len(x)
        train_loss = float(total) / max(steps, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at epoch {epoch}; "
                                     f"the learning rate {settings.lr:g} is probably too high")
        metrics = {"train/loss": train_loss}
        last = epoch == settings.epochs - 1
        validate = val is not None and (last or (epoch + 1) % settings.val_every == 0)
        if validate:
            if bn_batches is not None:
                recompute_bn_stats(model, bn_batches, settings.precise_bn_batches,
                                   device=device, amp=settings.amp)
                refreshed = epoch
            metrics.update(evaluate(model, val, settings.evaluation, "val", device=device,
                                    amp=settings.amp))
            if settings.objective not in metrics:
                raise KeyError(f"objective metric '{settings.objective}' is not among the "
                               f"computed metrics: {', '.join(sorted(metrics))}")
        metrics["time/epoch_end_s"] = time.perf_counter() - start
        result.history.append(metrics)
        improved = validate and _better(metrics[settings.objective],
                                        result.best_metrics.get(settings.objective),
                                        settings.maximize)
        if improved:
            result.best_epoch, result.best_metrics = epoch, metrics
        if on_epoch is not None:
            on_epoch(epoch, metrics, model, improved)
        if settings.max_seconds is not None and time.perf_counter() - start > settings.max_seconds:
            break
    if bn_batches is not None and refreshed != len(result.history) - 1:
        recompute_bn_stats(model, bn_batches, settings.precise_bn_batches, device=device,
                           amp=settings.amp)
    result.seconds = time.perf_counter() - start
    return result


def _masked_mean(loss: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mean per-pixel loss over the valid pixels (all pixels when ``valid`` is None)."""
    if valid is None:
        return loss.mean()
    return (loss * valid).sum() / valid.sum().clamp(min=1.0)


def _better(value: float, best: float | None, maximize: bool) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if maximize else value < best


def precise_bn_stream(train: Split, settings: TrainSettings,
                      device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """An endless stream of training batches for :func:`recompute_bn_stats`.

    It has its own :class:`Batches`, seeded from ``settings.seed`` but apart from the training
    stream, so drawing from it leaves the training order and augmentation unchanged. It does not
    augment: validation scores un-augmented images, so the statistics should describe those
    (brightness and contrast shift every channel's mean and variance), and sharing the training
    augmentation would consume its random stream.

    Args:
        train: The training split.
        settings: Supplies the batch size and the seed.
        device: Where the batches are put.

    Returns:
        Batches of the training batch size, epoch after epoch in fresh random orders.
    """
    seed = int(np.random.SeedSequence([settings.seed, 1]).generate_state(1)[0])
    source = Batches(train, settings.batch_size, device, None, seed)
    # Batches refuses fewer samples than one batch, so every epoch yields at least one batch.
    return itertools.chain.from_iterable(source.epoch() for _ in itertools.count())


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, steps: int, *,
                       device: torch.device | None = None, amp: bool = True) -> int:
    """Replace every BatchNorm layer's running statistics by their true average over batches.

    With a small momentum (MAP-Net's 0.01) and few steps, the running statistics are still
    mostly their initial values and lag the weights, so evaluation would score BatchNorm lag
    instead of the model. Here each layer's statistics are reset and re-estimated as the
    equal-weight average of the batch statistics of ``steps`` forward passes in training mode
    with the current weights (momentum None is PyTorch's cumulative average); the layers'
    momenta and the model's training mode are restored afterwards. Trained weights are not
    touched, nor is the global random state.

    Args:
        model: A MAP-Net, or any module taking inputs whose sides are multiples of 16 and at
            least 32 (other sizes go through ``forward_padded``, as in training); its
            ``_BatchNorm`` layers that track running statistics are re-estimated.
        batches: Yields input tensors, or tuples whose first element is the input, such as
            ``(x, y)`` or ``(x, y, mask)``; only the first ``steps`` are drawn.
        steps: Batches to average over.
        device: Where the batches go; default the device of the model's first parameter.
        amp: Forward under :func:`autocast`, as training does, so that the statistics are
            those of the activations the model is evaluated with.

    Returns:
        The number of batches averaged over (fewer than ``steps`` when ``batches`` runs out;
        0 when the model has no BatchNorm layer, in which case nothing is drawn).

    Raises:
        ValueError: ``steps`` is below 1, or ``batches`` yields nothing.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if device is None:
        device = next(model.parameters()).device
    drawn = iter(itertools.islice(batches, steps))
    first = next(drawn, None)
    # Checked before the reset: reset statistics with no batch to estimate them would be worse
    # than the lagging ones.
    if first is None:
        raise ValueError("no batches to estimate the BatchNorm statistics from")
    was_training = model.training
    momenta = [m.momentum for m in norms]
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in itertools.chain([first], drawn):
            x = batch if isinstance(batch, torch.Tensor) else batch[0]
            with autocast(device, amp):
                _forward(model, x.to(device, non_blocking=True).float())
            used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor,
            evaluation: Evaluation = Evaluation(), *, device: torch.device | None = None,
            tta: bool = False, amp: bool = True) -> torch.Tensor:
    """Foreground probabilities for whole images of any size.

    Args:
        model: Returns logits.
        images: (N, C, H, W) float in [0, 1].
        evaluation: ``full-image`` (zero-padded to the square :func:`padded_side`, as whole
            images are in training, and cropped back) or ``sliding-window`` (the published
            protocol: windows every ``stride`` pixels, zero padding bottom/right,
            probabilities averaged over overlaps); ``batch_size`` images or windows per pass.
        device: Default :func:`pick_device`.
        tta: Average over the identity and horizontal, vertical and both flips.
        amp: bf16 autocast on CUDA; False runs in fp32.

    Returns:
        (N, 1, H, W) float32 probabilities on the CPU.
    """
    if evaluation.protocol == "patches":
        raise ValueError("protocol 'patches' scores a split's patches; predict whole images "
                         "with full-image or sliding-window")
    device = device or pick_device()
    model.eval()
    x_all = torch.as_tensor(images)
    step = 1 if evaluation.protocol == "sliding-window" else evaluation.batch_size
    flips = [(), (-1,), (-2,), (-2, -1)] if tta else [()]
    out = []
    for i in range(0, len(x_all), step):
        x = x_all[i:i + step].to(device).float()
        probs = sum(_flipped(model, x, dims, evaluation, device, amp)
                    for dims in flips) / len(flips)
        out.append(probs.float().cpu())
    return torch.cat(out)


def _flipped(model: nn.Module, x: torch.Tensor, dims: tuple[int, ...], evaluation: Evaluation,
             device: torch.device, amp: bool) -> torch.Tensor:
    x = torch.flip(x, dims) if dims else x
    if evaluation.protocol == "full-image":
        height, width = x.shape[-2:]
        with autocast(device, amp):
            logits = _forward(model, _pad_square(x, padded_side(height, width)))
        probs = torch.sigmoid(logits.float())[..., :height, :width]
    else:
        probs = _sliding_window(model, x, evaluation, device, amp)
    return torch.flip(probs, dims) if dims else probs


def _sliding_window(model: nn.Module, x: torch.Tensor, evaluation: Evaluation,
                    device: torch.device, amp: bool) -> torch.Tensor:
    """Overlap-averaged window probabilities for one image (1, C, H, W)."""
    window, stride, batch_size = evaluation.window, evaluation.stride, evaluation.batch_size
    _, c, h, w = x.shape
    # Pad bottom/right with zeros until (size - window) is a multiple of the stride, as the
    # published evaluation does (DRIVE: 584x565 -> 584x569 at stride 5).
    ph = max(window, h + (-(h - window)) % stride)
    pw = max(window, w + (-(w - window)) % stride)
    padded = F.pad(x, (0, pw - w, 0, ph - h))
    cols = F.unfold(padded, window, stride=stride)  # (1, C*win*win, L)
    windows = cols[0].T.reshape(-1, c, window, window)
    probs = torch.empty(len(windows), 1, window, window, device=device)
    for i in range(0, len(windows), batch_size):
        with autocast(device, amp):
            logits = _forward(model, windows[i:i + batch_size])
        probs[i:i + batch_size] = torch.sigmoid(logits.float())
    summed = F.fold(probs.reshape(len(windows), -1).T[None], (ph, pw), window, stride=stride)
    counts = F.fold(torch.ones_like(probs).reshape(len(windows), -1).T[None], (ph, pw), window,
                    stride=stride)
    return (summed / counts)[:, :, :h, :w]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, evaluation: Evaluation, prefix: str = "val", *,
             device: torch.device | None = None, legacy: bool = False,
             accumulator: MetricAccumulator | None = None, amp: bool = True) -> dict[str, float]:
    """Score a split with pooled counts over its evaluated pixels (its FOV when it has one).

    A whole-image split whose extras hold ``lung`` and ``body_fov`` (lung target
    ``bcdu-outside``) is also scored the published way, estimated lung = FOV and not the
    prediction against the lung mask, under ``prefix/legacy_lung_*`` keys (see
    :func:`~mapnet_tune.metrics.legacy_lung_metrics`); that evaluation leaks ground truth
    through the FOV, so the target's own metrics stay the honest ones.

    Args:
        evaluation: The protocol (``patches`` scores the split's patch coordinates, e.g.
            DRIVE validation patches), window, stride, batch size and threshold.
        prefix: Metric key prefix (``val`` or ``test``).
        legacy: Also report the published "JS" (pixel accuracy) and thresholded AUC.
        accumulator: Collects the counts and histograms; pass a fresh one (with the
            evaluation's threshold) to read more than the metrics afterwards (its ROC curve).
        amp: bf16 autocast on CUDA; False scores in fp32.

    Returns:
        Metrics keyed ``prefix/name``.
    """
    device = device or pick_device()
    acc = accumulator if accumulator is not None else MetricAccumulator(evaluation.threshold)
    lung_counts: list[Confusion] = []  # legacy lung evaluation, per batch
    batch_size = evaluation.batch_size
    if evaluation.protocol == "patches":
        if split.patches is None:
            raise ValueError("protocol 'patches' needs a split with patch coordinates; "
                             "use full-image or sliding-window")
        model.eval()
        images = torch.from_numpy(split.images).to(device)
        masks = torch.from_numpy(split.masks).to(device)
        fov = torch.from_numpy(split.fov).to(device) if split.fov is not None else None
        coords = torch.from_numpy(split.patches.astype(np.int64)).to(device)
        for i in range(0, len(coords), batch_size):
            c = coords[i:i + batch_size]
            x = _gather_patches(images, c, split.patch_size).float()
            with autocast(device, amp):
                probs = torch.sigmoid(_forward(model, x).float())
            valid = _gather_patches(fov, c, split.patch_size) > 0 if fov is not None else None
            acc.update(probs, _gather_patches(masks, c, split.patch_size) > 0, valid)
    else:
        # Full images go through in batches; sliding-window batches its windows instead.
        step = batch_size if evaluation.protocol == "full-image" else 1
        lung, body_fov = split.extras.get("lung"), split.extras.get("body_fov")
        for i in range(0, len(split.images), step):
            probs = predict(model, split.images[i:i + step], evaluation, device=device, amp=amp)
            valid = torch.from_numpy(split.fov[i:i + step]) > 0 if split.fov is not None else None
            acc.update(probs, torch.from_numpy(split.masks[i:i + step]) > 0, valid)
            if lung is not None and body_fov is not None:
                lung_counts.append(legacy_lung_confusion(probs, lung[i:i + step],
                                                         body_fov[i:i + step], acc.threshold))
    metrics = acc.compute(prefix, legacy=legacy)
    if lung_counts:
        pooled = Confusion(*(sum(counts) for counts in zip(*lung_counts, strict=True)))
        metrics.update(legacy_lung_metrics(pooled, prefix))
    return metrics


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy on the CPU, for logging or registering without touching the training copy."""
    return copy.deepcopy(model).to("cpu").float().to(memory_format=torch.contiguous_format)
