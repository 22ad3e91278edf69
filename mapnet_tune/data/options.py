"""Dataset options: typed parsers with defaults, shared by every dataset module.

Values may arrive typed (from a study file) or as strings (from ``--option key=value``), so
every parser accepts both and raises :class:`UserError` naming the option on a bad value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mapnet_tune.errors import UserError

Parser = Callable[[str, Any], Any]


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
    return {
        key: spec.parse(key, given[key]) if key in given else spec.default
        for key, spec in specs.items()
    }


def integer(minimum: int = 0) -> Parser:
    """A parser for an integer of at least ``minimum``."""

    def parse(key: str, value: Any) -> int:
        try:
            number = int(value)
            ok = not isinstance(value, bool) and float(value) == number
        except (TypeError, ValueError):
            ok = False
        if not ok or number < minimum:
            raise UserError(f"option {key} must be an integer >= {minimum}, got {value!r}")
        return number

    return parse


def optional(parser: Parser) -> Parser:
    """A parser that also accepts ``None`` (or the strings "none"/"auto") for "not set"."""

    def parse(key: str, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "auto")):
            return None
        return parser(key, value)

    return parse


def choice(*values: Any) -> Parser:
    """A parser for one of a fixed set of values (compared as text, returned typed)."""

    def parse(key: str, value: Any) -> Any:
        for allowed in values:
            if str(value).lower() == str(allowed).lower():
                return allowed
        listed = ", ".join(str(v) for v in values)
        raise UserError(f"option {key} must be one of {listed}, got {value!r}")

    return parse


def boolean(key: str, value: Any) -> bool:
    """Parse true/false, yes/no, 1/0."""
    text = str(value).lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise UserError(f"option {key} must be true or false, got {value!r}")


def fraction(key: str, value: Any) -> float:
    """Parse a number in [0, 1)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number < 1.0:
        raise UserError(f"option {key} must be a number in [0, 1), got {value!r}")
    return number


def counts(names: tuple[str, ...]) -> Parser:
    """A parser for one positive integer per name: a mapping by name, a list, or "48/16/16"."""

    def parse(key: str, value: Any) -> tuple[int, ...]:
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
            raise UserError(
                f"option {key} must give a positive count for each of {'/'.join(names)}, "
                f"e.g. {{{example}}} or {'/'.join(['16'] * len(names))}; got {value!r}"
            )
        return numbers

    return parse
