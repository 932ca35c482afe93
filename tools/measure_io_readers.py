"""Measure the expert read backends on a cold file: MB/s, CPU time and event-loop lag.

    python tools/measure_io_readers.py --dir /path/on/disk --file-mib 512 --repeats 1

Writes a random file, then for each repeat and each backend (interleaved) drops the page cache
(as root; otherwise the reads are warm and the output says so) and reads the whole file in
`--read-mib` pieces into an arena of `--queue-depth` slots on uvloop.  Deletes the file at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import time
from pathlib import Path

import uvloop

from mer.io import open_reader
from page_cache import drop_page_cache  # tools/page_cache.py (tools run as scripts)


async def loop_lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """Sleep 1 ms at a time and record how late each wake-up is."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)


async def read_file(kind: str, path: Path, arena: mmap.mmap, read_nbytes: int, queue_depth: int, register: bool):
    reader = open_reader(kind, [path], memoryview(arena), queue_depth, register_buffers=register,
                         registration_unit=read_nbytes)
    stop, lags = asyncio.Event(), []
    probe = asyncio.create_task(loop_lag_probe(stop, lags))
    file_nbytes = path.stat().st_size
    view = memoryview(arena)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    pending: set[asyncio.Future] = set()
    for index, offset in enumerate(range(0, file_nbytes, read_nbytes)):
        slot = index % queue_depth
        if len(pending) == queue_depth:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        destination = view[slot * read_nbytes : (slot + 1) * read_nbytes]
        pending.add(reader.submit(0, offset, read_nbytes, destination))
    await asyncio.gather(*pending)
    wall_s, cpu_s = time.perf_counter() - wall_start, time.process_time() - cpu_start
    stop.set()
    await probe
    view.release()
    await reader.close()
    return file_nbytes / wall_s / 1e6, cpu_s, max(lags) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="directory on the disk to measure")
    parser.add_argument("--file-mib", type=int, default=512, help="size of the test file in MiB")
    parser.add_argument("--read-mib", type=int, default=64, help="size of one read in MiB")
    parser.add_argument("--queue-depth", type=int, default=2, help="reads in flight")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    path = args.dir / "mer-io-measure.bin"
    with open(path, "wb") as handle:
        for _ in range(args.file_mib):
            handle.write(os.urandom(1 << 20))
    read_nbytes = args.read_mib << 20
    arena = mmap.mmap(-1, read_nbytes * args.queue_depth)
    arena.write(b"\0" * len(arena))  # first touch outside the timing
    variants = [("uring", False), ("preadv", False), ("uring", True)]
    try:
        for repeat in range(args.repeats):
            for kind, register in variants:
                cold = drop_page_cache()
                mb_per_s, cpu_s, lag_ms = uvloop.run(
                    read_file(kind, path, arena, read_nbytes, args.queue_depth, register))
                name = kind + (" +fixed buffers" if register else "")
                print(f"repeat {repeat} {name:22s} {'cold' if cold else 'WARM'}: {mb_per_s:7.0f} MB/s, "
                      f"CPU {cpu_s * 1e3:6.0f} ms, max loop lag {lag_ms:5.1f} ms")
    finally:
        arena.close()
        path.unlink()


if __name__ == "__main__":
    main()
