"""argparse `type=` functions for flags outside the configuration schema (`mer.cli.pipeline_flags`
builds those): each checks one flag's value on its own and raises `argparse.ArgumentTypeError`, so a
bad value is a usage error (exit 2) naming the flag and the value. Rules that involve other flags or
the data (a d_model that does not fit a dtype's blocks) stay with the library: exit 1.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from mer.errors import MerError

SEED_LIMIT = 2**64  # seeds are 64-bit


def as_flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse(text)`, which raises a MerError for a bad value, as an argparse type: the error becomes
    a usage error naming the flag, e.g. `--ram-budget nonsense`."""

    def parse_flag(text: str) -> Any:
        try:
            return parse(text)
        except MerError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse_flag.__name__ = parse.__name__
    return parse_flag


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return value


def seed(text: str) -> int:
    """A 64-bit seed: an integer in 0..2**64-1."""
    value = _integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed in 0..2**64-1")
    return value


def non_negative_number(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def probability_mass(text: str) -> float:
    """A number in (0, 1], e.g. the nucleus mass of `--top-p`."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1]")
    return value


def utf8_text(text: str) -> str:
    """Text that is valid UTF-8. Python hands over argv bytes that are not UTF-8 as lone surrogates
    (surrogateescape); a tokenizer cannot encode those, so they are refused here, naming the byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00 if 0xDC80 <= ord(text[error.start]) <= 0xDCFF else None
        what = f"byte 0x{byte:02x}" if byte is not None else f"character U+{ord(text[error.start]):04X}"
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 ({what} at character {error.start}); give the text in UTF-8") from None
    return text
