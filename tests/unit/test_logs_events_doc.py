"""docs/events.md documents every event the code logs: each `log.info/warning/error("name", ...)` call
in `mer/` and `workers/` (names given literally or as `mer.metrics.events` constants) has its row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mer.metrics import events as run_events
from mer.logging_setup import LOG_SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"debug", "info", "warning", "error", "critical", "exception"}
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def logged_event_names() -> dict[str, set[str]]:
    """Event name -> files that log it."""
    constants = {name: value for name, value in vars(run_events).items() if name.isupper() and isinstance(value, str)}
    found: dict[str, set[str]] = {}
    for path in [*ROOT.joinpath("mer").rglob("*.py"), *ROOT.joinpath("workers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS
                    and node.args):
                continue
            first = node.args[0]
            name = first.value if isinstance(first, ast.Constant) else constants.get(getattr(first, "id", ""))
            if isinstance(name, str) and EVENT_NAME.fullmatch(name):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_logged_event_is_documented():
    documented = ROOT.joinpath("docs", "events.md").read_text()
    names = logged_event_names()
    assert {"token_done", "expert_read", "acquire_done", "compute_job", "decision_done", "run_summary"} <= set(names)
    missing = {name: sorted(paths) for name, paths in names.items() if f"`{name}`" not in documented}
    assert missing == {}, f"events logged but not in docs/events.md: {missing}"


def test_the_documented_schema_version_is_the_one_written():
    documented = ROOT.joinpath("docs", "events.md").read_text()
    assert f"**Schema version: {LOG_SCHEMA_VERSION}**" in documented
