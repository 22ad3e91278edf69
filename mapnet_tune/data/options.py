"""Dataset options: typed parsers with defaults, shared by every dataset module.

Values may arrive typed (from a study file) or as strings (from ``--option key=value``), so
every parser accepts both. A dataset's options are validated as one pydantic model made from its
:class:`Option` specs, and a bad value raises :class:`UserError` naming the option, worded by the
same translator as the study files (:func:`mapnet_tune.config.first_problem`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, ValidationError, create_model

from mapnet_tune.config import first_problem
from mapnet_tune.errors import UserError

#: What an option is validated as: a pydantic type, ``Annotated[T, BeforeValidator(parse)]``
#: where ``parse`` converts a typed value or its text, or raises ValueError saying what is valid.
Parser = Any


@dataclass(frozen=True)
class Option:
    """One option of a dataset: its default, its parser and a one-line help text."""

    default: Any
    parse: Parser
    help: str


def resolve(dataset: str, specs: Mapping[str, Option], given: Mapping[str, Any] | None) -> dict:
    """All options of a dataset, the given ones parsed and the rest at their defaults.

    Raises:
        UserError: For an unknown key (the message lists the valid ones) or a bad value.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise UserError(
            f"unknown option '{unknown[0]}' for dataset {dataset}; "
            f"valid options: {', '.join(sorted(specs))}"
        )
    model = create_model(
        f"{dataset}_options",
        __config__=ConfigDict(extra="forbid", frozen=True),
        **{key: (spec.parse, spec.default) for key, spec in specs.items()},
    )
    try:
        return dict(model.model_validate(given))
    except ValidationError as exc:
        key, problem = first_problem(exc)
        raise UserError(f"option {key} {problem}") from None


def integer(minimum: int = 0) -> Parser:
    """A parser for an integer of at least ``minimum``."""

    def parse(value: Any) -> int:
        try:
            number = int(value)
            ok = not isinstance(value, bool) and float(value) == number
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok or number < minimum:
            raise ValueError(f"must be an integer >= {minimum}, got {value!r}")
        return number

    return Annotated[int, BeforeValidator(parse)]


def _none_words(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("none", "auto") else value


def optional(parser: Parser) -> Parser:
    """A parser that also accepts ``None`` (or the strings "none"/"auto") for "not set"."""
    return Annotated[parser | None, BeforeValidator(_none_words)]


def choice(*values: Any) -> Parser:
    """A parser for one of a fixed set of values (compared as text, returned typed)."""

    def parse(value: Any) -> Any:
        for allowed in values:
            if str(value).lower() == str(allowed).lower():
                return allowed
        listed = ", ".join(str(v) for v in values)
        raise ValueError(f"must be one of {listed}, got {value!r}")

    return Annotated[Any, BeforeValidator(parse)]


def _boolean(value: Any) -> bool:
    text = str(value).lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _fraction(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number < 1.0:
        raise ValueError(f"must be a number in [0, 1), got {value!r}")
    return number


def _regex(value: Any) -> str:
    try:
        re.compile(str(value))
    except re.error as exc:
        raise ValueError(f"must be a regular expression, got {value!r} ({exc})") from None
    return str(value)


#: Parses true/false, yes/no, 1/0, on/off.
boolean: Parser = Annotated[bool, BeforeValidator(_boolean)]
#: Parses a number in [0, 1).
fraction: Parser = Annotated[float, BeforeValidator(_fraction)]
#: Parses a regular expression (kept as its text).
regex: Parser = Annotated[str, BeforeValidator(_regex)]


def counts(names: tuple[str, ...]) -> Parser:
    """A parser for one positive integer per name: a mapping by name, a list, or "48/16/16"."""

    def parse(value: Any) -> tuple[int, ...]:
        if isinstance(value, Mapping):
            items = [value.get(name) for name in names] if set(value) == set(names) else []
        elif isinstance(value, str):
            items = value.replace(",", "/").split("/")
        else:
            items = value
        try:
            numbers = tuple(int(item) for item in items)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != len(names) or min(numbers) < 1:
            example = ", ".join(f"{name}: 16" for name in names)
            raise ValueError(
                f"must give a positive count for each of {'/'.join(names)}, "
                f"e.g. {{{example}}} or {'/'.join(['16'] * len(names))}; got {value!r}"
            )
        return numbers

    return Annotated[tuple[int, ...], BeforeValidator(parse)]
