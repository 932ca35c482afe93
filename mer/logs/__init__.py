"""Structured-log analysis: read a run's JSON-lines log (`--log-file`) and explain the run.

- `reader`: parse a log file (envelope checks, malformed lines with line numbers, schema version);
- `runs`: split a file into runs (by run id), events in CLOCK_MONOTONIC order;
- `recompute`: the run summary recomputed exactly as the run computed it;
- `series`: every plotted series as plain data; `plots`: a thin matplotlib layer over them;
- `compare`: summaries side by side with ratios; `timeline`: one token across all processes.

The events and their fields are documented in docs/events.md.
"""
