"""Time encode + decode of the two hot messages: an ExpertBatchJob with one (1, 4096) float32 row per
expert for two experts, and an ExpertBatchResult with (16, 2, 4096) float32 partials (16 d_ff slices).

Usage: python tools/protocol_timing.py [--repeats 5] [--number 20000]
Prints the best of `repeats` runs of `number` calls each, in microseconds per call.
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from mer.protocol import ComputeItem, ExpertBatchJob, ExpertBatchResult, SliceRange, decode, encode


def sample_job() -> ExpertBatchJob:
    items = [ComputeItem(3, 4, 5, 0), ComputeItem(9, 1, 2, 0)]
    slices = [SliceRange(index * 896, (index + 1) * 896) for index in range(16)]
    return ExpertBatchJob(7, items, slices, np.ones((2, 4096), dtype=np.float32), [0, 1, 2])


def sample_result() -> ExpertBatchResult:
    return ExpertBatchResult(7, 1, np.ones((16, 2, 4096), dtype=np.float32), 123.4)


def best_microseconds(call, repeats: int, number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeats)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timing runs; the best is reported")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing run")
    arguments = parser.parse_args()
    for message in (sample_job(), sample_result()):
        frames = encode(message)
        received = [bytes(frame) for frame in frames]  # as a socket would hand them over
        encode_us = best_microseconds(lambda: encode(message), arguments.repeats, arguments.number)
        decode_us = best_microseconds(lambda: decode(received), arguments.repeats, arguments.number)
        array_nbytes = sum(len(frame) for frame in received[2:])
        print(
            f"{type(message).__name__:17s} body {len(received[1]):4d} B, arrays {array_nbytes:7d} B: "
            f"encode {encode_us:6.2f} us, decode {decode_us:6.2f} us, total {encode_us + decode_us:6.2f} us"
        )


if __name__ == "__main__":
    main()
