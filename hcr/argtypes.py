"""argparse helpers shared by the ``hcr`` subcommands: types that name a bad flag with what was
expected, and flag defaults read from the settings dataclass the flags fill."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from types import SimpleNamespace


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


positive_int = argument_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = argument_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = argument_type(float, lambda v: v > 0, "a positive number")
unit_float = argument_type(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


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
