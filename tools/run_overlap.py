#!/usr/bin/env python3
"""Where the time of a `mer-pipeline run` goes: disk and compute, overlapped or not.

Reads a run's `--log-file` and splits the window from the first token's start to the last token's
end (`token_done`) by whether some expert read is in flight (`expert_read`: `t_submit`..`t_done`)
and some compute job runs (`compute_job`: `t_start`..`t_end`): both, disk only, compute only,
neither. The disk's busy share against the window says how close the run is to the disk's limit;
"compute only" and "neither" are the time the disk waits for the rest of the pipeline.

    mer-pipeline run --store STORE --tokens 300 --cache-slots 64 --workload markov --log-file run.jsonl
    python tools/run_overlap.py run.jsonl            # the goal-5 table of docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STATES = ("both", "disk only", "compute only", "neither")


def read_intervals(log_file: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]], tuple[float, float], int]:
    """(read intervals, compute intervals, the tokens' window, tokens) from a run's log."""
    reads, jobs, tokens = [], [], []
    with open(log_file) as lines:
        for line in lines:
            if '"expert_read"' not in line and '"compute_job"' not in line and '"token_done"' not in line:
                continue
            event = json.loads(line)
            kind = event.get("event")
            if kind == "expert_read" and event.get("t_submit") is not None:
                reads.append((float(event["t_submit"]), float(event["t_done"])))
            elif kind == "compute_job":
                jobs.append((float(event["t_start"]), float(event["t_end"])))
            elif kind == "token_done":
                tokens.append((float(event["t_start_s"]), float(event["t_end_s"])))
    if not tokens:
        raise SystemExit(f"{log_file}: no token_done events: not the log of a `mer-pipeline run` (--log-file)")
    if not jobs:
        raise SystemExit(f"{log_file}: no compute_job events (were they logged at info level?)")
    return reads, jobs, (tokens[0][0], tokens[-1][1]), len(tokens)


def split_time(reads, jobs, window: tuple[float, float]) -> dict[str, float]:
    """Seconds of `window` in each of `STATES`."""
    start, end = window
    edges = []
    for kind, intervals in ((0, reads), (1, jobs)):
        for begin, finish in intervals:
            begin, finish = max(begin, start), min(finish, end)
            if begin < finish:
                edges += [(begin, 1, kind), (finish, -1, kind)]
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # an interval's end before another's start at the same time
    busy = [0, 0]
    seconds = dict.fromkeys(STATES, 0.0)
    last = start
    for time, step, kind in edges:
        seconds[_state(busy)] += time - last
        last = time
        busy[kind] += step
    seconds[_state(busy)] += end - last
    return seconds


def _state(busy: list[int]) -> str:
    return "both" if busy[0] and busy[1] else "disk only" if busy[0] else "compute only" if busy[1] else "neither"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_file", type=Path, help="the run's --log-file")
    parser.add_argument("--json", action="store_true", help="print the split as JSON")
    args = parser.parse_args(argv)
    reads, jobs, window, tokens = read_intervals(args.log_file)
    seconds = split_time(reads, jobs, window)
    total = window[1] - window[0]
    disk = seconds["both"] + seconds["disk only"]
    compute = seconds["both"] + seconds["compute only"]
    result = {"window_s": total, "tokens": tokens, "reads": len(reads), "compute_jobs": len(jobs),
              "seconds": seconds, "disk_busy_pct": 100 * disk / total, "compute_busy_pct": 100 * compute / total,
              "cycle_over_busiest": total / max(disk, compute, 1e-9)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"window {total:.2f} s, {tokens} tokens, {len(reads)} reads, {len(jobs)} compute jobs")
    for state in STATES:
        print(f"  {state:13s} {seconds[state]:7.2f} s  {100 * seconds[state] / total:5.1f}%  "
              f"{1e3 * seconds[state] / tokens:6.1f} ms/token")
    print(f"  disk busy {result['disk_busy_pct']:.1f}%, compute busy {result['compute_busy_pct']:.1f}%, "
          f"window / the busier of the two {result['cycle_over_busiest']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
