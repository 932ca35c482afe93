"""`mer-pipeline`: thin subcommands over library functions.

Each subcommand lives in its own module under `mer.cli` and exposes
`register(subparsers) -> None`, which adds its parser and sets `handler=run` with
`run(args) -> int`. Human output goes to stderr; stdout carries only what a command produces.
Every way a command can end (an error, a bad flag, a signal, a closed pipe) is turned into one line
and an exit status in one place, `mer.cli.exit_status`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mer import __version__
from mer.cli.exit_status import EXIT_USAGE, exit_status, sigterm_unwinds
from mer.environment import KNOWN_VARIABLES, read_environment
from mer.errors import Terminated

COMMAND_MODULES = (
    "mer.cli.convert_command",
    "mer.cli.synth_command",
    "mer.cli.store_command",
    "mer.cli.run_command",
    "mer.cli.up_command",
    "mer.cli.generate_command",
    "mer.cli.perplexity_command",
    "mer.cli.serve_command",
    "mer.cli.top_command",
    "mer.cli.trace_command",
    "mer.cli.logs_command",
    "mer.cli.keys_command",
    "mer.cli.shard_serve_command",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the flag and value, and exit 2
    (argparse would print the whole usage synopsis first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="mer-pipeline",
        description="mer: run Mixture-of-Experts models whose experts stream from SSD.",
    )
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = "mer-pipeline"
    try:
        with sigterm_unwinds():
            parser = build_parser()
            args = parser.parse_args(argv)  # a bad flag: one line, exit 2 (OneLineErrorParser)
            if not getattr(args, "handler", None):
                parser.print_help(sys.stderr)
                return EXIT_USAGE
            command = f"mer-pipeline {args.command}"
            for name in read_environment().unknown_variables:  # bad values of known ones are errors
                print(f"mer-pipeline: warning: unknown environment variable {name} (mer reads "
                      f"{', '.join(KNOWN_VARIABLES)})", file=sys.stderr)
            return int(args.handler(args) or 0)
    except (Exception, KeyboardInterrupt, Terminated) as error:
        return exit_status(command, error)

if __name__ == "__main__":
    sys.exit(main())
