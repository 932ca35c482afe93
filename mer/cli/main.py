"""`mer-pipeline`: thin subcommands over library functions.

Each subcommand lives in its own module under `mer.cli` and exposes
`register(subparsers) -> None`, which adds its parser and sets `handler=run` with
`run(args) -> int`. Human output goes to stderr; stdout carries only what a command produces.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mer import __version__
from mer.environment import KNOWN_VARIABLES, read_environment
from mer.errors import MerError

COMMAND_MODULES = (
    "mer.cli.convert_command",
    "mer.cli.synth_command",
    "mer.cli.store_command",
    "mer.cli.run_command",
    "mer.cli.up_command",
    "mer.cli.generate_command",
    "mer.cli.trace_command",
    "mer.cli.logs_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer-pipeline",
        description="mer: run Mixture-of-Experts models whose experts stream from SSD.",
    )
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        for name in read_environment().unknown_variables:  # bad values of known ones are errors
            print(f"mer-pipeline: warning: unknown environment variable {name} (mer reads "
                  f"{', '.join(KNOWN_VARIABLES)})", file=sys.stderr)
        return int(args.handler(args) or 0)
    except MerError as error:
        print(f"mer-pipeline {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mer-pipeline {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
