"""The pieces every study-file model is built from: a strict frozen base, value types and
the translation of pydantic's errors into one line."""

from __future__ import annotations

import reprlib
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: How a split is scored: its patch coordinates, whole images, or the published sliding window.
EVAL_PROTOCOLS = ("patches", "full-image", "sliding-window")


def one_of(values: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in values:
            raise ValueError(f"is '{value}'; valid values: {', '.join(values)}")
        return value

    return AfterValidator(check)


def number(value: Any) -> int | float:
    # bool is an int in Python; a YAML `true` where a number belongs is a mistake. The value
    # keeps its type (8 stays an int, 8.0 a float): the digest of existing studies depends on it.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {reprlib.repr(value)}")
    return value


def null_is_empty(value: Any) -> Any:
    return {} if value is None else value


Number = Annotated[int | float, BeforeValidator(number)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Options = Annotated[dict[str, Any], BeforeValidator(null_is_empty)]


def error(problem: str, key: str) -> PydanticCustomError:
    """An error about ``key`` inside the value being validated (see :func:`first_problem`)."""
    return PydanticCustomError("study", "{problem}", {"problem": problem, "key": key})


class Model(BaseModel):
    """Base of the config models: frozen, strict (no "3" for 3), unknown keys listed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, raw: Any) -> Any:
        # Ahead of pydantic's own extra="forbid" check, so that the message lists the valid keys
        # and an unknown key is reported before any bad value, as the file is read top down.
        if isinstance(raw, dict):
            allowed = sorted(cls._file_keys())
            unknown = sorted(str(key) for key in raw if key not in allowed)
            if unknown:
                raise error(
                    f"is not a known setting; valid keys here: {', '.join(allowed)}", unknown[0]
                )
        return raw

    @classmethod
    def _file_keys(cls) -> set[str]:
        return {field.validation_alias or name for name, field in cls.model_fields.items()}


#: What each pydantic error type tells the user: ``{input}`` is the offending value, the other
#: fields come from the error's context. The only bounds used here are gt=0, ge=0, le=1 and
#: min_length=1; "study" errors come from :func:`_error`, "value_error" ones from our validators.
_PROBLEMS = {
    "int_type": "must be an integer, got {input}",
    "float_type": "must be a number, got {input}",
    "string_type": "must be a string, got {input}",
    "bool_type": "must be true/false, got {input}",
    "dict_type": "must be a mapping, got {input}",
    "model_type": "must be a mapping, got {input}",
    "list_type": "must be a list, got {input}",
    "missing": "is required",
    "greater_than": "must be positive, got {input}",
    "greater_than_equal": "must be {ge} or more, got {input}",
    "less_than_equal": "must be at most {le}, got {input}",
    "too_short": "is an empty list; give at least one",
    "study": "{problem}",
    "value_error": "{error}",
}


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """The first error of a pydantic ``ValidationError`` as (dotted key, one-line problem).

    E.g. ``("train.epochs", "must be positive, got 0")``; the dataset options share it.
    """
    error = exc.errors(include_url=False)[0]
    ctx = error.get("ctx") or {}
    loc = [*error["loc"], ctx["key"]] if error["type"] == "study" else error["loc"]
    template = _PROBLEMS.get(error["type"], "is not valid: {msg}")
    problem = template.format(input=reprlib.repr(error["input"]), msg=error["msg"], **ctx)
    return ".".join(str(part) for part in loc), " ".join(problem.split())
