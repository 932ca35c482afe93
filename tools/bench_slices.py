"""What cutting experts into d_ff slices costs a compute worker (the `expert_slices` setting).

    python tools/bench_slices.py [--slices 1,2,4,8,16] [--batches 1,8] [--repeats 5] [--json]

Two random valid Mixtral-shaped q4_0 experts (d_model 4096, d_ff 14336: 99 MB each, native layout)
are copied into POSIX shared memory, as the slot arena holds them, and mapped read-only. For each
slice count S it times what worker 0 of 2 computes in a decode step that routed to both experts:
its slices (0, 2, 4, ...) of each expert (`mer.compute.batches.item_partials`, 1 kernel thread),
against the same work done as one whole expert (S = 1). Prints milliseconds (median of
`--repeats`) and the ratio to the whole expert, per batch size. The shared memory is removed
on exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import shared_memory

import numpy as np

from mer.compute.batches import item_partials
from mer.compute.expert_format import ExpertFormat, ExpertPayload
from mer.compute.slicing import plan_slices, slices_of_worker
from mer.quant.random_blocks import random_expert_payload

D_MODEL, D_FF = 4096, 14336


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", default="1,2,4,8,16", help="slice counts to time (comma-separated)")
    parser.add_argument("--batches", default="1,8", help="token rows per expert (comma-separated)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args(argv)


def median_ms(call, repeats: int) -> float:
    call()  # warm: compile and fault the pages in
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e3)
    return sorted(samples)[len(samples) // 2]


def run(arguments: argparse.Namespace) -> dict:
    expert_format = ExpertFormat.build(D_MODEL, D_FF, ("q4_0",) * 3, "native")
    segments, payloads = [], []
    try:
        for seed in (1, 2):
            data = random_expert_payload(expert_format, seed)
            segment = shared_memory.SharedMemory(create=True, size=data.nbytes)
            segments.append(segment)
            view = np.ndarray(data.shape, np.uint8, segment.buf)
            view[:] = data
            view.setflags(write=False)
            payloads.append(ExpertPayload(expert_format, view))
        rows = []
        for batch in (int(text) for text in arguments.batches.split(",")):
            x = np.random.default_rng(batch).standard_normal((batch, D_MODEL)).astype(np.float32)
            whole_ms = median_ms(lambda: item_partials(payloads[0], x, plan_slices(expert_format, 1)), arguments.repeats)
            for count in (int(text) for text in arguments.slices.split(",")):
                slices = plan_slices(expert_format, count)
                mine = [slices[index] for index in slices_of_worker(len(slices), 0, 2)]
                if count == 1:
                    milliseconds = whole_ms
                else:
                    milliseconds = median_ms(lambda: [item_partials(payload, x, mine) for payload in payloads],
                                             arguments.repeats)
                rows.append({"batch": batch, "slices": len(slices), "ms": round(milliseconds, 2),
                             "vs_whole": round(milliseconds / whole_ms, 2)})
                print(f"batch {batch}, {len(slices)} slices: {milliseconds:.2f} ms", file=sys.stderr, flush=True)
        return {"expert_bytes": expert_format.payload_nbytes, "rows": rows}
    finally:
        for segment in segments:
            segment.close()
            segment.unlink()


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    report = run(arguments)
    if arguments.json:
        print(json.dumps(report))
        return 0
    print("worker 0 of 2, a decode step routed to two Mixtral q4_0 experts, 1 kernel thread, shared memory")
    print(f"{'batch':>5} {'slices':>6} {'ms':>8} {'vs whole':>9}")
    for row in report["rows"]:
        print(f"{row['batch']:>5} {row['slices']:>6} {row['ms']:>8.2f} {row['vs_whole']:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
