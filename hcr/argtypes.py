"""argparse types shared by the ``hcr`` subcommands: a bad flag is named with what was expected."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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
