"""Time `mer-pipeline generate` from the command to the start of its prefill, optionally from a cold page cache.

    python tools/measure_startup.py --model MODEL.gguf [--runs 3] [--drop-caches] [-- EXTRA GENERATE FLAGS]

Each run starts `mer-pipeline generate --model MODEL --prompt hi -n 1 --log-file LOG` (plus the extra
flags) and reads its merged log: the prefill started at the first `generation_token` event's `t_mono`
minus the summary's `prefill_s` (CLOCK_MONOTONIC, the clock this script reads before starting the
command). It prints one line per run (start-up to prefill, prefill, whole command, in seconds) and the
median. `--drop-caches` writes 3 to /proc/sys/vm/drop_caches after a sync before each run (root only):
the model, the store and mer's own files are then read from the disk. The store must already be
converted (run once without measuring), or the first run's start-up includes the conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MER_PIPELINE = str(Path(sys.executable).with_name("mer-pipeline"))


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"measure_startup: cannot drop the page cache ({error}); run as root or without --drop-caches")


def one_run(model: Path, extra: list[str]) -> tuple[float, float, float]:
    """(start-up to prefill, prefill, whole command) in seconds."""
    with tempfile.TemporaryDirectory(prefix="mer-startup-") as directory:
        log = Path(directory) / "run.jsonl"
        argv = [MER_PIPELINE, "generate", "--model", str(model), "--prompt", "hi", "-n", "1", "--log-file", str(log),
                *extra]
        started = time.monotonic()
        completed = subprocess.run(argv, capture_output=True, text=True)
        ended = time.monotonic()
        if completed.returncode != 0:
            raise SystemExit(f"measure_startup: generate failed ({completed.returncode}):\n{completed.stderr}")
        events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    first_token = next(event["t_mono"] for event in events if event.get("event") == "generation_token")
    prefill_s = next(event["prefill_s"] for event in events if event.get("event") == "generation_summary")
    return first_token - prefill_s - started, prefill_s, ended - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the GGUF (its store already converted)")
    parser.add_argument("--runs", type=int, default=3, help="runs (3)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    parser.add_argument("extra", nargs="*", help="flags passed on to generate (after --)")
    args = parser.parse_args()
    startups = []
    for run in range(args.runs):
        if args.drop_caches:
            drop_page_cache()
        startup, prefill, whole = one_run(args.model, args.extra)
        startups.append(startup)
        print(f"run {run + 1}: start-up to prefill {startup:.2f} s, prefill {prefill:.2f} s, command {whole:.2f} s")
    print(f"median start-up to prefill: {statistics.median(startups):.2f} s over {args.runs} runs"
          f"{' (cold page cache)' if args.drop_caches else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
