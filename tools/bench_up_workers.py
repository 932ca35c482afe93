"""`mer-pipeline up` with 1 against 2 compute workers on the embedded model, in alternation.

    python tools/bench_up_workers.py [--rounds 5] [--tokens 32] [-- EXTRA UP FLAGS]

Each round runs `mer-pipeline up --json --compute-workers 1` and then `--compute-workers 2` (the order
swapped every other round, so a drift in the machine's load hits both alike) and reads the JSON
summary: decode tokens/s, prefill tokens/s, the decode steps' dense and expert time per MoE block,
and the whole command's wall time. Prints one line per run,
the medians per worker count and the ratios 2 workers / 1 worker measured in this run. The tokens of
every run must be identical (the output does not depend on the worker count); a difference ends the
benchmark with an error. Used for `up`'s worker rule (docs/pipeline.md, "How many compute workers").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("decode_tps", "prefill_tps", "dense_us", "expert_us", "wall_s")
MER_PIPELINE = str(Path(sys.executable).with_name("mer-pipeline"))


def one_run(workers: int, tokens: int, extra: list[str]) -> dict:
    argv = [MER_PIPELINE, "up", "--json", "--tokens", str(tokens), "--compute-workers", str(workers), *extra]
    started = time.monotonic()
    completed = subprocess.run(argv, capture_output=True, text=True)
    wall = time.monotonic() - started
    if completed.returncode != 0:
        raise SystemExit(f"bench_up_workers: up failed ({completed.returncode}):\n{completed.stderr}")
    summary = json.loads(completed.stdout)
    return {"workers": workers, "decode_tps": summary["decode_tps"], "prefill_tps": summary["prefill_tps"],
            "dense_us": summary["dense_us_per_block"], "expert_us": summary["expert_us_per_block"],
            "wall_s": wall, "tokens": summary["tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations (5)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run (32)")
    parser.add_argument("extra", nargs="*", help="flags passed on to up (after --)")
    args = parser.parse_args()
    runs: list[dict] = []
    for round_index in range(args.rounds):
        order = (1, 2) if round_index % 2 == 0 else (2, 1)
        for workers in order:
            run = one_run(workers, args.tokens, args.extra)
            if runs and run["tokens"] != runs[0]["tokens"]:
                raise SystemExit(f"bench_up_workers: {workers} workers generated other tokens than the first run")
            runs.append(run)
            print(f"round {round_index + 1}, {workers} worker(s): decode {run['decode_tps']:.1f} tok/s, "
                  f"prefill {run['prefill_tps']:.1f} tok/s, per MoE block dense {run['dense_us']:.0f} us experts "
                  f"{run['expert_us']:.0f} us, command {run['wall_s']:.1f} s", flush=True)
    medians = {}
    for workers in (1, 2):
        mine = [run for run in runs if run["workers"] == workers]
        medians[workers] = {key: statistics.median(run[key] for run in mine)
                            for key in KEYS}
        print(f"median, {workers} worker(s): decode {medians[workers]['decode_tps']:.1f} tok/s, prefill "
              f"{medians[workers]['prefill_tps']:.1f} tok/s, per MoE block dense {medians[workers]['dense_us']:.0f} us "
              f"experts {medians[workers]['expert_us']:.0f} us, command {medians[workers]['wall_s']:.1f} s")
    print("ratio 2 workers / 1 worker: " + ", ".join(f"{key} {medians[2][key] / medians[1][key]:.2f}" for key in KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
