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

# Each subcommand's name and the module that registers it, in `--help` order. Only the invoked
# command's module is imported (`build_parser(argv)`): the modules pull in numba, the model and the
# process graph, and importing all of them cost every command ~1.5 s before it did anything.
COMMANDS = {
    "convert": "mer.cli.convert_command",
    "synth": "mer.cli.synth_command",
    "store": "mer.cli.store_command",
    "run": "mer.cli.run_command",
    "up": "mer.cli.up_command",
    "generate": "mer.cli.generate_command",
    "perplexity": "mer.cli.perplexity_command",
    "serve": "mer.cli.serve_command",
    "top": "mer.cli.top_command",
    "trace": "mer.cli.trace_command",
    "logs": "mer.cli.logs_command",
    "keys": "mer.cli.keys_command",
    "shard-serve": "mer.cli.shard_serve_command",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the flag and value, and exit 2
    (argparse would print the whole usage synopsis first). Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `mer-pipeline`. Given the command line `argv` whose first word names a command,
    only that command is registered (the parse is the same as the whole parser's); otherwise (no
    command, `--help`, `--version`, an unknown word) every command is, so help and errors list them all."""
    parser = OneLineErrorParser(
        prog="mer-pipeline",
        description="mer: run Mixture-of-Experts models whose experts stream from SSD.",
    )
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    invoked = argv[0] if argv else None
    for module_name in [COMMANDS[invoked]] if invoked in COMMANDS else COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = "mer-pipeline"
    try:
        with sigterm_unwinds():
            argv = sys.argv[1:] if argv is None else list(argv)
            parser = build_parser(argv)
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
