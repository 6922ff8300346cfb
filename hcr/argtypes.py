"""What a setting accepts, said once for the ``hcr`` subcommands' flags and the settings dataclasses they fill:
rules (a test and its words), argparse types that name a bad flag with what was expected, ``check_fields``
for a dataclass built from Python, and flag defaults read from the dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable
from types import SimpleNamespace

Rule = tuple[Callable[[object], bool], str]  # (accepts the value?, what it expects, in words)


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


POSITIVE_INT: Rule = (lambda v: _integer(v) and v >= 1, "a positive integer")
NON_NEGATIVE_INT: Rule = (lambda v: _integer(v) and v >= 0, "an integer >= 0")
POSITIVE_NUMBER: Rule = (lambda v: _real(v) and v > 0, "a positive number")
UNIT_NUMBER: Rule = (lambda v: _real(v) and 0 <= v <= 1, "a number in [0, 1]")
PROBABILITY: Rule = (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]")
FLAG: Rule = (lambda v: isinstance(v, bool), "True or False")
TOKEN_ID: Rule = (_integer, "a token id (an int)")


def optional(rule: Rule) -> Rule:
    """``rule``, or None."""
    accept, expected = rule
    return (lambda v: v is None or accept(v), f"None or {expected}")


def non_empty_tuple_of(rule: Rule) -> Rule:
    """A non-empty tuple or list whose every item ``rule`` accepts."""
    accept, expected = rule
    return (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(accept(x) for x in v),
            f"a non-empty tuple, each item {expected}")


def check_values(prefix: str = "", **checked: tuple[object, Rule]) -> None:
    """A ValueError naming the first argument ``name=(value, rule)`` whose rule refuses its value (``prefix``
    before the name: ``"EvalSettings."``)."""
    for name, (value, (accept, expected)) in checked.items():
        if not accept(value):
            raise ValueError(f"{prefix}{name} must be {expected}, got {value!r}")


def check_fields(settings, **rules: Rule) -> None:
    """``check_values`` of the dataclass instance ``settings``' fields: the flags check what the command line
    passes, this what a Python caller does."""
    check_values(f"{type(settings).__name__}.", **{name: (getattr(settings, name), rule) for name, rule in rules.items()})


def argument_type(kind: type, accept: Callable, expected: str) -> Callable[[str], object]:
    """A parser of ``kind`` values that ``accept`` allows; errors say ``expected``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = argument_type(int, *POSITIVE_INT)
non_negative_int = argument_type(int, *NON_NEGATIVE_INT)
positive_float = argument_type(float, *POSITIVE_NUMBER)
unit_float = argument_type(float, *UNIT_NUMBER)
probability = argument_type(float, *PROBABILITY)


def field_defaults(settings: type) -> SimpleNamespace:
    """The declared defaults of the dataclass ``settings`` by field name (``defaults.learning_rate``).

    A flag takes its default (and the one its help prints) from here, so the command line and the
    Python API cannot drift apart. Read from the fields, not from an instance: ``__post_init__`` may
    fill in derived values that a flag must leave unset. Fields without a default are left out.
    """
    defaults = {}
    for field in dataclasses.fields(settings):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return SimpleNamespace(**defaults)
