"""The ``retrain`` section: the recipes retrain-best trains, validates and registers with."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Annotated, Any

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from mapnet_tune.config.base import (
    EVAL_PROTOCOLS,
    Model,
    Options,
    PositiveFloat,
    PositiveInt,
    error,
    null_is_empty,
    one_of,
)

#: How retrain-best trains: ``full`` on whole images (padded to a square multiple of 16, the loss
#: masked to the real pixels and the FOV) and predicts whole images; ``crop`` on the patches
#: that ``dataset_options`` make, predicting by sliding windows of the patch size.
RESOLUTIONS = ("full", "crop")
#: The name of the recipe that the ``retrain`` section's own keys describe.
DEFAULT_RECIPE = "default"


class RecipeConfig(Model):
    """One retraining recipe: what the registered model, and each of its CV folds, trains with.

    Attributes:
        epochs: Training epochs; the final weights are kept, in the folds as in the registered
            model, so that the cross-validated score estimates the registered model.
        resolution: One of :data:`RESOLUTIONS`.
        dataset_options: Merged over ``dataset.options`` to prepare the retraining data, e.g.
            DRIVE ``{patch_size: 256, patches_per_image: 600}`` or ISIC ``{size: 512}``.
        batch_scale: A trial's batch size is multiplied by this (rounded, at least 1), so that
            larger samples keep the pixels per optimiser step: (64 / 256)^2 for DRIVE crops.
        eval_protocol: ``full-image`` or ``sliding-window`` (windows the size of the training
            patches); by default full-image for ``full`` and sliding-window for ``crop``.
        eval_stride: Sliding-window stride while validating (the folds, the val split).
        test_stride: Sliding-window stride of the registered model: its single test score,
            ``evaluate`` and ``predict``; None keeps ``eval_stride``. DRIVE's published numbers
            use 5.
        eval_batch_size: Images (full-image) or windows (sliding-window) per forward pass.
        val_every: A fold scores its held-out images every this many epochs (and after the
            last), so its curve shows whether ``epochs`` is enough.
    """

    epochs: PositiveInt = 20
    resolution: Annotated[str, one_of(RESOLUTIONS)] = "full"
    dataset_options: Options = Field(default_factory=dict)
    batch_scale: PositiveFloat = 1.0
    # Test images have no patch coordinates: a retrained model is scored on whole images.
    eval_protocol: Annotated[str, one_of(EVAL_PROTOCOLS[1:])] | None = None
    eval_stride: PositiveInt = 16
    test_stride: PositiveInt | None = None
    eval_batch_size: PositiveInt = 16
    val_every: PositiveInt = 5

    @field_validator("eval_protocol")
    @classmethod
    def _fits_resolution(cls, protocol: str | None, info: ValidationInfo) -> str | None:
        if protocol not in (None, "full-image") and info.data.get("resolution") == "full":
            raise ValueError(
                f"is '{protocol}', but a model trained at resolution full predicts "
                "whole images; use full-image, or resolution: crop for sliding windows"
            )
        return protocol

    @property
    def protocol(self) -> str:
        """The evaluation protocol, explicit or implied by the resolution."""
        if self.eval_protocol is not None:
            return self.eval_protocol
        return "full-image" if self.resolution == "full" else "sliding-window"


class RetrainConfig(RecipeConfig):
    """How retrain-best trains, validates and registers the chosen configurations.

    The section's own recipe keys (inherited from :class:`RecipeConfig`) are the default recipe.

    Attributes:
        folds: K-fold cross-validation over train + val decides among the candidates and the
            champion gate; 0 trains on train and decides on the val split.
        threshold: The registered model's probability threshold: a number (0.5 by default,
            as the published rows use), or ``tune``: the one that maximises the objective's
            metric on the out-of-fold probabilities of the chosen candidate's folds (on val
            with ``--folds 0``). Selection itself always compares at 0.5.
        variants: Named recipes: each is the default recipe with the variant's keys over it.
        recipes: ``default`` and every variant; ``--recipe`` picks which ones compete.
    """

    folds: int = 0
    threshold: float | str = 0.5
    variants: dict[str, RecipeConfig] = Field(default_factory=dict)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, threshold: Any) -> float | str:
        if str(threshold).lower() == "tune":
            return "tune"
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            value = math.nan
        if not 0 < value < 1 or isinstance(threshold, bool):
            raise ValueError(f"must be a probability in (0, 1) or 'tune', got {threshold!r}")
        return value

    @field_validator("folds")
    @classmethod
    def _usable_folds(cls, folds: int) -> int:
        if folds == 1 or folds < 0:
            raise ValueError(f"must be 0 (decide on the val split) or at least 2, got {folds}")
        return folds

    @field_validator("variants", mode="before")
    @classmethod
    def _over_default(cls, variants: Any, info: ValidationInfo) -> Any:
        if not isinstance(variants, dict):
            return null_is_empty(variants)
        for name in variants:
            usable = isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum()
            if not usable or name == DEFAULT_RECIPE:
                usage = f"letters, digits, - and _; not '{DEFAULT_RECIPE}'"
                raise error(f"is not a usable recipe name ({usage})", str(name))
        # The default recipe's fields come first, so info.data holds those that are valid.
        own = {key: info.data[key] for key in RecipeConfig.model_fields if key in info.data}
        return {
            name: {**own, **body} if isinstance(body, dict) else body
            for name, body in variants.items()
        }

    @cached_property
    def recipes(self) -> dict[str, RecipeConfig]:
        """``default`` (the section's own keys) and every variant, by name."""
        default = RecipeConfig(**{key: getattr(self, key) for key in RecipeConfig.model_fields})
        return {DEFAULT_RECIPE: default, **self.variants}
