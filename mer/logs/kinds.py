"""What kind of command wrote a run's log, told by the events that start its work.

- `run`: a benchmark job (`mer-pipeline run`, `up` with a workload): `run_started`;
- `generate`: a generation (`mer-pipeline generate`, `up --model`): `generation_started`;
- `perplexity`: a perplexity run (`mer-pipeline perplexity`): `perplexity_started`;
- `convert`: a conversion (`mer-pipeline convert --log-file`): `convert_started` or `convert_done`
  (a generation that converted its model first is a `generate` log; one that failed before its
  generation started reads as the conversion it did);
- `graph`: a process graph that started no job (it failed at start-up or was stopped first):
  `run_started_supervisor` or `child_spawned`;
- `unknown`: none of these.
"""

from __future__ import annotations

from mer.logs.runs import RunLog
from mer.metrics.events import RUN_STARTED

RUN, GENERATE, PERPLEXITY, CONVERT, GRAPH, UNKNOWN = "run", "generate", "perplexity", "convert", "graph", "unknown"

DESCRIPTIONS = {
    RUN: "a benchmark run (mer-pipeline run / up)",
    GENERATE: "a generation (mer-pipeline generate / up --model)",
    PERPLEXITY: "a perplexity run (mer-pipeline perplexity)",
    CONVERT: "a conversion (mer-pipeline convert)",
    GRAPH: "a process graph that started no job",
    UNKNOWN: "no run, generation, perplexity run or conversion",
}

_MARKERS = ((RUN, (RUN_STARTED,)), (GENERATE, ("generation_started",)), (PERPLEXITY, ("perplexity_started",)),
            (CONVERT, ("convert_started", "convert_done")),
            (GRAPH, ("run_started_supervisor", "child_spawned")))


def log_kind(run: RunLog) -> str:
    """The kind of `run` (one of the names above)."""
    names = {event["event"] for event in run.events}
    return next((kind for kind, markers in _MARKERS if names.intersection(markers)), UNKNOWN)


def kind_line(kind: str) -> str:
    """`log kind: generate (a generation ...)`: the first line of a text summary."""
    return f"log kind: {kind} ({DESCRIPTIONS[kind]})"
