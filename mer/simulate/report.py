"""The rows of `mer-pipeline trace simulate`: one per predictor x policy x cache size, as JSON and as a table.

Row keys: `predictor`, `policy`, `cache_slots`, `pool_slots` (the table's slots: with a predictor,
`predict_fanout` more, as the live arena), `hits`, `misses`, `hit_rate_pct`, `stalls` (lookups that
waited for a read), `reads`, `prefetches_issued`, `prefetches_used`, `prefetches_wasted`,
`prefetches_dropped`, `min_misses` (Belady's MIN on `pool_slots` slots: the fewest misses, and so the
fewest reads, any demand-fetch cache of that size can have on the trace), and, when the expert sizes
are known, `bytes_read`, `bytes_per_token`, `min_bytes_read` (what MIN must read); `None` otherwise.
`projected_s_per_token` is present only when a projection is possible (sizes and its inputs known).
Prefetching can bring `stalls` below `min_misses`, never `bytes_read` below `min_bytes_read`.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from mer.simulate.projection import ExpertSizes, ProjectionInputs, project_seconds_per_token
from mer.simulate.simulator import ReplayTrace, SimulationResult, simulate

RESULT_KEYS = ("predictor", "policy", "cache_slots", "pool_slots", "tokens", "lookups", "hits", "misses",
               "hit_rate_pct", "stalls", "reads", "prefetches_issued", "prefetches_used", "prefetches_wasted", "prefetches_dropped")


def simulation_rows(trace: ReplayTrace, cache_sizes: Sequence[int], policies: Sequence[str],
                    predictors: Sequence[str], *, sizes: ExpertSizes | None = None,
                    projection: ProjectionInputs | None = None, predict_fanout: int = 2,
                    pipeline_depth: int = 1) -> list[dict]:
    """Replay `trace` for every predictor, policy and cache size (in that nesting) and build the rows."""
    min_results: dict[int, SimulationResult] = {}
    rows = []
    for predictor in predictors:
        for policy in policies:
            for cache_slots in cache_sizes:
                result = simulate(trace, cache_slots, policy, predictor=predictor,
                                  predict_fanout=predict_fanout, pipeline_depth=pipeline_depth)
                pool = result.pool_slots
                if pool not in min_results:
                    min_results[pool] = (result if policy == "belady" and predictor == "none"
                                         else simulate(trace, pool, "belady"))
                rows.append(result_row(result, min_results[pool], trace, sizes, projection))
    return rows


def result_row(result: SimulationResult, minimum: SimulationResult, trace: ReplayTrace,
               sizes: ExpertSizes | None, projection: ProjectionInputs | None) -> dict:
    """One JSON row of a replay, with MIN's misses (and bytes) for the same number of slots."""
    row = {key: getattr(result, key) for key in RESULT_KEYS}
    row.update(min_misses=minimum.misses, bytes_read=None, bytes_per_token=None, min_bytes_read=None)
    if sizes is None:
        return row
    all_reads: Counter = result.demand_reads + result.prefetch_reads
    bytes_read = sizes.total(all_reads)
    tokens = max(result.tokens, 1)
    row.update(bytes_read=bytes_read, bytes_per_token=bytes_read / tokens, min_bytes_read=sizes.total(minimum.demand_reads))
    if projection is not None:
        stall_bytes = sizes.total(result.demand_reads)
        row["projected_s_per_token"] = project_seconds_per_token(projection, stall_bytes / tokens, bytes_read / tokens)
    return row


def _cell(value, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as an aligned text table (bytes and projection columns say n/a when unknown)."""
    columns = [("predictor", "predictor", 0), ("policy", "policy", 0), ("cache_slots", "slots", 0),
               ("hits", "hits", 0), ("misses", "misses", 0), ("hit_rate_pct", "hit %", 2),
               ("stalls", "stalls", 0), ("min_misses", "MIN misses", 0), ("reads", "reads", 0),
               ("bytes_per_token", "bytes/token", 0), ("projected_s_per_token", "s/token", 4)]
    if not any("projected_s_per_token" in row for row in rows):
        columns.pop()
    lines = [[title for _, title, _ in columns]]
    for row in rows:
        lines.append([_cell(row.get(key), digits) if key in row else "n/a" for key, _, digits in columns])
    widths = [max(len(line[index]) for line in lines) for index in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) if index > 1 else cell.ljust(width)
                               for index, (cell, width) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)
