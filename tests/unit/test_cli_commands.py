"""`mer-pipeline`'s parser imports only the invoked command's module, and parses as the whole parser does."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from mer.cli.main import COMMANDS, OneLineErrorParser, build_parser


@pytest.mark.parametrize("name, module_name", list(COMMANDS.items()))
def test_each_command_s_module_registers_exactly_that_command(name, module_name):
    subparsers = OneLineErrorParser(prog="mer-pipeline").add_subparsers(dest="command")
    importlib.import_module(module_name).register(subparsers)
    assert list(subparsers.choices) == [name]


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return list(action.choices)


@pytest.mark.parametrize("argv", [
    ["logs", "summarize", "run.jsonl"],
    ["generate", "--prompt", "def ", "-n", "3", "--cache-slots", "4"],
    ["keys", "--out", "keys-dir", "--force"],
])
def test_the_invoked_command_alone_parses_as_the_whole_parser_does(argv):
    assert subcommands(build_parser(argv)) == [argv[0]]
    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [[], ["--help"], ["--version"], ["bogus"], None])
def test_without_a_known_command_every_command_is_registered(argv):
    assert subcommands(build_parser(argv)) == list(COMMANDS)


def test_a_light_command_does_not_import_the_others():
    code = ("import sys; from mer.cli.main import build_parser; build_parser(['keys', '--help']); "
            "import json; print(json.dumps(sorted(name for name in ('numba', 'mer.cli.generate_command', "
            "'mer.cli.convert_command', 'mer.cli.logs_command') if name in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
