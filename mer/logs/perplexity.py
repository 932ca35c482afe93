"""A perplexity run's values recomputed from its raw events (`mer-pipeline perplexity --log-file`).

From the `perplexity_chunk_done` events alone (each chunk's `count`, `nll` and `nll2`), in chunk order,
with llama-perplexity's formulas (`mer.model.perplexity.PerplexityTally`): the running value after
each chunk, the final value and its ±, each chunk's own value, and `seconds` (the chunks' sum). The
lookups are the sums over `moe_block_done` (present with --log-file). A run that did not finish (no
`perplexity_summary`) is summarized from the chunks it scored, with a warning; one that did is checked
against its logged `perplexity_summary` (floats within 1e-9 relative), a difference being a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from mer.errors import EventLogError
from mer.logs.runs import RunLog
from mer.model.perplexity import ChunkScore, PerplexityTally

PERPLEXITY_STARTED = "perplexity_started"
PERPLEXITY_CHUNK_DONE = "perplexity_chunk_done"
PERPLEXITY_SUMMARY = "perplexity_summary"
MOE_BLOCK_DONE = "moe_block_done"


@dataclass(frozen=True)
class PerplexityLogSummary:
    """A perplexity run's values from its events, with the names of `perplexity --json`."""

    model: str
    context: int
    chunks: int  # scored (all of them unless the run was interrupted)
    chunks_planned: int
    scored_tokens: int
    ppl: float
    ppl_error: float | None
    nll: float
    chunk_ppl: list[float]
    running_ppl: list[float]
    seconds: float
    hits: int
    misses: int

    def to_json_dict(self) -> dict[str, Any]:
        return {"kind": "perplexity", **{field.name: getattr(self, field.name) for field in fields(self)}}


@dataclass(frozen=True)
class RecomputedPerplexity:
    summary: PerplexityLogSummary
    warnings: list[str]


def summarize_perplexity(run: RunLog) -> RecomputedPerplexity:
    """The values of the perplexity run in `run` from its raw events (see the module docstring)."""
    started = run.last(PERPLEXITY_STARTED)
    if started is None:
        raise EventLogError(f"{run.label}: no {PERPLEXITY_STARTED} event")
    chunks = sorted(run.named(PERPLEXITY_CHUNK_DONE), key=lambda event: event["chunk"])
    if not chunks:
        raise EventLogError(f"{run.label}: no {PERPLEXITY_CHUNK_DONE} event: no chunk was scored")
    tally = PerplexityTally()
    try:
        for event in chunks:
            tally.add(ChunkScore(int(event["chunk"]), int(event["count"]), float(event["nll"]), float(event["nll2"]),
                                 float(event["seconds"])))
    except (KeyError, TypeError, ValueError) as error:
        raise EventLogError(f"{run.label}: a {PERPLEXITY_CHUNK_DONE} event lacks or mangles {error}") from None
    blocks = run.named(MOE_BLOCK_DONE)
    summary = PerplexityLogSummary(
        model=str(started.get("model")), context=int(started.get("context", 0)), chunks=len(chunks),
        chunks_planned=int(started.get("chunks", len(chunks))), scored_tokens=tally.count, ppl=tally.ppl,
        ppl_error=tally.ppl_error, nll=tally.mean_nll, chunk_ppl=[score.ppl for score in tally.chunks],
        running_ppl=list(tally.running), seconds=math.fsum(score.seconds for score in tally.chunks),
        hits=sum(event["hits"] for event in blocks), misses=sum(event["misses"] for event in blocks))
    logged = run.last(PERPLEXITY_SUMMARY)
    if logged is None:
        return RecomputedPerplexity(summary, [
            f"{run.label}: no {PERPLEXITY_SUMMARY} event: the run did not finish (interrupted or failed); its values "
            f"are those of the {len(chunks)} of {summary.chunks_planned} chunks it scored"])
    return RecomputedPerplexity(summary, _differences(run, summary, logged))


def _differences(run: RunLog, summary: PerplexityLogSummary, logged: dict[str, Any]) -> list[str]:
    differing = []
    for key in ("chunks", "scored_tokens", "ppl", "ppl_error", "nll", "chunk_ppl", "running_ppl"):
        mine, theirs = getattr(summary, key), logged.get(key)
        pairs = list(zip(mine, theirs)) if isinstance(mine, list) and isinstance(theirs, list) else [(mine, theirs)]
        same = (not isinstance(mine, list) or len(mine) == len(theirs or [])) and all(
            math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, (int, float)) else a == b
            for a, b in pairs)
        if not same:
            differing.append(f"{key} ({mine!r} here, {theirs!r} logged)")
    if not differing:
        return []
    return [f"{run.label}: the recomputed perplexity differs from the logged {PERPLEXITY_SUMMARY} in "
            f"{', '.join(differing)}"]


def format_perplexity(summary: PerplexityLogSummary) -> str:
    """The values as text: llama-perplexity's lines, then the run's figures."""
    s = summary
    running = ",".join(f"[{index + 1}]{value:.4f}" for index, value in enumerate(s.running_ppl)) + ","
    final = (f"Final estimate: PPL = {s.ppl:.4f} +/- {s.ppl_error:.5f}" if s.ppl_error is not None
             else f"Final estimate: PPL = {s.ppl:.4f} (no error estimate)")
    return "\n".join([
        f"perplexity of {s.model}: {s.chunks} of {s.chunks_planned} chunks of {s.context} tokens, "
        f"{s.scored_tokens} scored, in {s.seconds:.2f} s",
        running, final,
        f"lookups: hits={s.hits} misses={s.misses}",
    ])
