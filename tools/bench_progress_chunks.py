"""What computing an item's rows in chunks costs: a compute worker reports progress between chunks of
`PROGRESS_CHUNK_ROWS` rows (`mer.compute.batches.item_partials_in_chunks`), so that one expert on a
large prefill batch never trips the router's job deadline.

    python tools/bench_progress_chunks.py [--rows 32,128,512] [--repeats N] [--dtype q4_0] [--threads 1]

For a random valid expert of the Mixtral shape (d_model 4096, d_ff 14336; q4_0 by default, or three
comma-separated dtypes such as q4_k,q4_k,q6_k) it times, for each row count, the item's partials on
all its d_ff slices in one call (`item_partials`, the baseline) and in chunks, interleaved, `--repeats`
times each, and prints the medians, the time of one chunk (what the deadline must allow between two
reports) and the ratio chunked / one call measured in the same run. The outputs are checked to be
byte for byte equal. The host is shared and noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mer.compute.batches import PROGRESS_CHUNK_ROWS, item_partials, item_partials_in_chunks
from mer.compute.expert_format import ExpertFormat, ExpertPayload
from mer.compute.slicing import plan_slices
from mer.quant.random_blocks import random_expert_payload

D_MODEL, D_FF = 4096, 14336


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,128,512", help="comma-separated row counts of one item")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="q4_0", help="a dtype, or three comma-separated (gate, up, down)")
    parser.add_argument("--threads", type=int, default=1, help="kernel threads")
    args = parser.parse_args()
    dtypes = tuple(args.dtype.split(",")) if "," in args.dtype else (args.dtype,) * 3
    if len(dtypes) != 3:
        parser.error(f"--dtype {args.dtype!r}: give one dtype or three (gate, up, down)")
    try:
        row_counts = [int(text) for text in args.rows.split(",")]
    except ValueError:
        parser.error(f"--rows {args.rows!r}: expected comma-separated integers")
    if args.repeats < 1 or args.threads < 1 or min(row_counts) < 1:
        parser.error("--repeats, --threads and every --rows entry must be >= 1")
    expert_format = ExpertFormat.build(D_MODEL, D_FF, dtypes)
    payload = ExpertPayload(expert_format, random_expert_payload(expert_format, 1))
    slices = plan_slices(expert_format)
    x = np.random.default_rng(0).standard_normal((max(row_counts), D_MODEL)).astype(np.float32)
    item_partials(payload, x[:1], slices, args.threads)  # compile
    print(f"expert {D_MODEL}x{D_FF} {','.join(dtypes)}, {len(slices)} slices, {args.threads} kernel thread(s), "
          f"chunks of {PROGRESS_CHUNK_ROWS} rows, medians of {args.repeats}")
    print(f"{'rows':>6} {'one call s':>11} {'chunked s':>10} {'per chunk s':>12} {'chunked/one':>12}")
    for rows in row_counts:
        whole_times, chunk_times = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            whole = item_partials(payload, x[:rows], slices, args.threads)
            whole_times.append(time.perf_counter() - started)
            chunked = np.empty_like(whole)
            started = time.perf_counter()
            item_partials_in_chunks(payload, x[:rows], slices, args.threads, chunked, lambda chunk_rows: None)
            chunk_times.append(time.perf_counter() - started)
            if chunked.tobytes() != whole.tobytes():
                raise SystemExit(f"{rows} rows: the chunked partials differ from one call's")
        one, split = statistics.median(whole_times), statistics.median(chunk_times)
        chunks = -(-rows // PROGRESS_CHUNK_ROWS)
        print(f"{rows:>6} {one:>11.3f} {split:>10.3f} {split / chunks:>12.3f} {split / one:>12.2f}")


if __name__ == "__main__":
    main()
