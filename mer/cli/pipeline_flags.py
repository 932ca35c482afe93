"""The one flag builder: every command's configuration flags, generated from the schema (`mer.config`).

A flag's name, metavar, type, help text (the field's documentation, then its choices or its range
with the unit, then its default) all come from the field's declaration, so no command re-declares a
setting and two commands cannot explain one flag differently. Flags default to None: the config
file (or the schema's default) decides unless the flag is given (`config_overrides`).

A flag's value is checked against the schema as the command line is parsed, so a bad one is a usage
error (exit 2) naming the flag and the value; the same value in a config file is an error (exit 1).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mer.cli.flag_types import as_flag_type
from mer.config import AUTO, SETTINGS, check_value, flag_name
from mer.errors import ConfigError
from mer.runtime.ram_budget import parse_size

_PARSERS = {"an integer": int, "a number": float}


def worker_count(text: str) -> int | str:
    """`auto` or an integer, for --compute-workers (its range is the schema's to check)."""
    if text == AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or {AUTO!r}") from None


def _parse(key: str, text: str):
    """The text of flag `key` as its type (choices and comma-separated names stay strings)."""
    setting = SETTINGS[key]
    if key == "compute_workers":
        return worker_count(text)
    if setting.is_path:
        if not text:
            raise argparse.ArgumentTypeError("an empty path")
        return Path(text)
    parse = _PARSERS.get(setting.wanted)
    if parse is None:
        return text
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {setting.wanted}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked_flag_type(key: str):
    """An argparse type for flag `key`: its value parsed, then checked by the schema (range, choices),
    so that a bad value is a usage error naming the flag and the value."""

    def parse_and_check(text: str):
        value = _parse(key, text)
        try:
            check_value(key, value, flag_name(key))
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag_name(key)}: ")) from None
        return value

    parse_and_check.__name__ = key
    return parse_and_check


def _flag_type(key: str):
    return bool if SETTINGS[key].wanted == "a boolean" else _checked_flag_type(key)


def _help(key: str) -> str:
    setting = SETTINGS[key]
    text = setting.doc
    if setting.choices and setting.wanted == "a string":
        text += f" One of: {', '.join(setting.choices)}."
    if setting.bounds is not None:
        low, high = setting.bounds
        text += f" Range {low}..{high}" + (f" ({setting.unit})." if setting.unit else ".")
    default = setting.default
    if default is not None and not isinstance(default, bool):
        text += f" Default: {','.join(default) if isinstance(default, tuple) else default}."
    return text.replace("%", "%%")


def add_config_flag(parser, key: str) -> None:
    """The flag of configuration key `key` on `parser` (or a mutually exclusive group of it)."""
    setting = SETTINGS[key]
    if _flag_type(key) is bool:  # --layered turns a default-off setting on, --no-prefetch a default-on one off
        parser.add_argument(flag_name(key), dest=key, action="store_false" if setting.default else "store_true",
                            default=None, help=setting.doc)
    else:
        parser.add_argument(flag_name(key), dest=key, type=_flag_type(key), metavar=setting.metavar, default=None,
                            help=_help(key))


def add_model_flags(parser: argparse.ArgumentParser, *, ram_budget_help: str) -> None:
    """`--model` (default: the embedded model) and the cache's size, `--ram-budget SIZE` or `--cache-slots C`:
    the flags of the commands that run a model (`generate`, `serve`)."""
    parser.add_argument("--model", type=Path, default=None, metavar="MODEL.gguf",
                        help="The MoE GGUF (default: the tiny model shipped with mer, docs/tiny-model.md).")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--ram-budget", type=as_flag_type(parse_size), metavar="SIZE", help=ram_budget_help)
    add_config_flag(memory, "cache_slots")


def add_config_flags(parser: argparse.ArgumentParser, *, job: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add --config and the flag of every configuration key that `job` reads (None: every key; a key
    specific to another job is left out), except those in `skip` (which the command adds itself)."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML configuration (configs/*.toml, the same keys as these flags); flags override it.")
    for key, setting in SETTINGS.items():
        if key not in skip and (job is None or setting.job in ("", job)):
            add_config_flag(parser, key)
