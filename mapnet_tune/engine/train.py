"""Training: seeded batches (patches or whole padded images), the fit loop, precise BN."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mapnet_tune.data import Split
from mapnet_tune.data.augment import Augment, BatchAugment
from mapnet_tune.engine.device import (
    autocast,
    forward,
    gather_patches,
    pad_square,
    padded_side,
    pick_device,
    prepare_model,
)
from mapnet_tune.engine.infer import Evaluation, evaluate

#: What :func:`fit` calls after every epoch: (epoch, metrics, model, improved).
EpochCallback = Callable[[int, dict[str, float], nn.Module, bool], None]
#: What :func:`fit` calls after every optimiser step: (epoch, steps done in this epoch, steps
#: in the epoch, samples in this step), so that a caller can show a rate and an ETA.
StepCallback = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class TrainSettings:
    """What one training run needs besides the model and the data.

    ``batch_size`` is the optimiser's batch: one Adam step per ``batch_size`` samples.
    ``weight_decay`` is decoupled (AdamW's): 0, the official recipe, is plain Adam.
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
    weight_decay: float = 0.0
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

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        augment: Augment | BatchAugment | None,
        seed: int,
    ) -> None:
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
                valid = (
                    torch.from_numpy(split.fov).to(home)
                    if split.fov is not None
                    else torch.ones_like(self.masks)
                )
                self.images, self.masks, self.valid = (
                    pad_square(t, side) for t in (self.images, self.masks, valid)
                )
        self.coords = (
            torch.from_numpy(split.patches.astype(np.int64)).to(home)
            if split.patches is not None
            else None
        )
        self.count = len(split.patches) if split.patches is not None else len(split.images)
        if self.count < batch_size:
            raise ValueError(
                f"batch size {batch_size} is larger than the {self.count} training "
                f"samples; choose a batch size of at most {self.count}"
            )

    def __len__(self) -> int:
        """Batches per epoch; the last incomplete batch is dropped, as the official loop does."""
        return self.count // self.batch_size

    def epoch(
        self, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """One epoch of (x, y, valid) float batches on the device, in a fresh random order."""
        order = torch.from_numpy(self.rng.permutation(self.count)).to(self.images.device)
        steps = len(self) if limit is None else min(limit, len(self))
        for step in range(steps):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            if self.coords is not None:
                coords = self.coords[idx]
                size = self.split.patch_size
                x = gather_patches(self.images, coords, size)
                y = gather_patches(self.masks, coords, size)
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


def fit(
    model: nn.Module,
    train: Split,
    val: Split | None,
    settings: TrainSettings,
    augment: Augment | BatchAugment | None = None,
    on_epoch: EpochCallback | None = None,
    device: torch.device | None = None,
    on_step: StepCallback | None = None,
) -> FitResult:
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
        on_step: Called after every optimiser step (see :data:`StepCallback`).

    Returns:
        The history and the best validated epoch by ``settings.objective``.
    """
    device = device or pick_device()
    torch.manual_seed(settings.seed)
    model = prepare_model(model, device)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        decoupled_weight_decay=True,
        fused=device.type == "cuda",
    )
    loss_fn = nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor([settings.pos_weight], device=device), reduction="none"
    )
    batches = Batches(train, settings.batch_size, device, augment, settings.seed)
    bn_batches = (
        precise_bn_stream(train, settings, device) if settings.precise_bn_batches > 0 else None
    )
    result = FitResult()
    start = time.perf_counter()
    refreshed = -1  # the epoch after which BatchNorm statistics were last re-estimated
    per_epoch = min(settings.steps_per_epoch or len(batches), len(batches))
    for epoch in range(settings.epochs):
        model.train()
        total, steps = torch.zeros((), device=device), 0
        for x, y, valid in batches.epoch(settings.steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, settings.amp):
                logits = forward(model, x).float()
            loss = _masked_mean(loss_fn(logits, y), valid)
            loss.backward()
            optimizer.step()
            # Accumulating on the device avoids a host sync per step.
            total += loss.detach()
            steps += 1
            result.samples_seen += len(x)
            if on_step is not None:
                on_step(epoch, steps, per_epoch, len(x))
        train_loss = float(total) / max(steps, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training loss became {train_loss} at epoch {epoch}; "
                f"the learning rate {settings.lr:g} is probably too high"
            )
        metrics = {"train/loss": train_loss}
        last = epoch == settings.epochs - 1
        validate = val is not None and (last or (epoch + 1) % settings.val_every == 0)
        if validate:
            if bn_batches is not None:
                recompute_bn_stats(
                    model, bn_batches, settings.precise_bn_batches, device=device, amp=settings.amp
                )
                refreshed = epoch
            metrics.update(
                evaluate(model, val, settings.evaluation, "val", device=device, amp=settings.amp)
            )
            if settings.objective not in metrics:
                raise KeyError(
                    f"objective metric '{settings.objective}' is not among the "
                    f"computed metrics: {', '.join(sorted(metrics))}"
                )
        metrics["time/epoch_end_s"] = time.perf_counter() - start
        result.history.append(metrics)
        improved = validate and _better(
            metrics[settings.objective],
            result.best_metrics.get(settings.objective),
            settings.maximize,
        )
        if improved:
            result.best_epoch, result.best_metrics = epoch, metrics
        if on_epoch is not None:
            on_epoch(epoch, metrics, model, improved)
        if settings.max_seconds is not None and time.perf_counter() - start > settings.max_seconds:
            break
    if bn_batches is not None and refreshed != len(result.history) - 1:
        recompute_bn_stats(
            model, bn_batches, settings.precise_bn_batches, device=device, amp=settings.amp
        )
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


def precise_bn_stream(
    train: Split, settings: TrainSettings, device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
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
def recompute_bn_stats(
    model: nn.Module,
    batches: Iterable,
    steps: int,
    *,
    device: torch.device | None = None,
    amp: bool = True,
) -> int:
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
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
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
                forward(model, x.to(device, non_blocking=True).float())
            used += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used
