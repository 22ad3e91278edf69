"""The search space: which hyperparameters a study may search or fix, and their specs."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    create_model,
    model_validator,
)

from mapnet_tune.config.base import Model, Number, number

#: Hyperparameters a study may search or fix, with the value used when a file leaves one out.
#: Augmentation defaults to off so that a study only augments what it asks for.
HYPERPARAMETERS: dict[str, float | int] = {
    "lr": 1e-3,
    "batch_size": 4,
    "pos_weight": 1.0,
    "flip_p": 0.0,
    "rot90_p": 0.0,
    "hue_shift": 0,
    "brightness": 0.0,
    "contrast": 0.0,
    "weight_decay": 0.0,
}
#: Hyperparameters added after studies were created: left out of the digest while fixed at
#: their default, so that those studies keep their digest and resume after an upgrade.
ADDED_LATER = ("weight_decay",)

# The values each hyperparameter may take; lr and pos_weight must also be above 0.
_BOUNDS = dict.fromkeys(("flip_p", "rot90_p", "brightness", "contrast"), (0, 1))
_BOUNDS |= {"hue_shift": (0, 180), "lr": (0, math.inf), "pos_weight": (0, math.inf)}
_BOUNDS["batch_size"] = (1, math.inf)
_BOUNDS["weight_decay"] = (0, math.inf)


class ParamSpec(Model):
    """One hyperparameter: either a fixed value or a range/choices to sample from."""

    name: str
    kind: str  # "fixed", "float", "int" or "categorical"
    value: Number | None = None
    low: Number | None = None
    high: Number | None = None
    log: bool = False
    choices: tuple[Number, ...] = ()

    @property
    def searched(self) -> bool:
        """True when trials sample this parameter."""
        return self.kind != "fixed"

    def can_be_nonzero(self) -> bool:
        """True when some trial could use a non-zero value (used to reject hue on grey)."""
        if self.kind == "fixed":
            return bool(self.value)
        if self.kind == "categorical":
            return any(bool(c) for c in self.choices)
        return bool(self.low) or bool(self.high)


class _Choices(Model):
    """``search_space.NAME: {choices: [...]}``."""

    choices: Annotated[list[Number], Field(min_length=1)]


class _Range(Model):
    """``search_space.NAME: {low, high, log}``: a float range (an int bound becomes a float)."""

    integer: bool = Field(False, alias="int")
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _not_empty(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"is an empty range: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"is log-scaled, so low must be positive, got {self.low}")
        return self


class _IntRange(_Range):
    """``search_space.NAME: {low, high, log, int: true}``."""

    low: int
    high: int


def _param(raw: Any, info: ValidationInfo) -> ParamSpec:
    """A ``search_space`` entry (a number, choices or a range) as the spec of its field."""
    name = info.field_name
    if not isinstance(raw, dict):
        spec = ParamSpec(name=name, kind="fixed", value=number(raw))
    elif "choices" in raw:
        choices = tuple(_Choices.model_validate(raw).choices)
        spec = ParamSpec(name=name, kind="categorical", choices=choices)
    else:
        r = (_IntRange if raw.get("int") is True else _Range).model_validate(raw)
        kind = "int" if r.integer else "float"
        spec = ParamSpec(name=name, kind=kind, low=r.low, high=r.high, log=r.log)
    lo, hi = _BOUNDS[name]
    values = [spec.value] if spec.kind == "fixed" else list(spec.choices) or [spec.low, spec.high]
    for v in values:
        if not lo <= v <= hi or (name in ("lr", "pos_weight") and v <= 0):
            raise ValueError(f"has value {v} outside its valid range [{lo}, {hi}]")
    if name == "batch_size" and any(float(v) != int(v) for v in values):
        raise ValueError("must hold integers")
    return spec


# One field per hyperparameter, so that errors name it (search_space.lr.low); a left-out one is
# fixed at its default.
SearchSpace = create_model(
    "SearchSpace",
    __base__=Model,
    **{
        name: (Annotated[ParamSpec, BeforeValidator(_param)], Field(default, validate_default=True))
        for name, default in HYPERPARAMETERS.items()
    },
)
