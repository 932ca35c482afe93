"""Dense weights kept resident: the router's copy of every dense tensor in its own memory.

Mapped from the GGUF, the dense weights (attention, router gates, embeddings, LM head: ~1.6 GB of a
Mixtral q4_0) are page cache, and when the model does not fit in RAM the expert traffic pushes
them out: every block's attention then reads its weights from disk again (measured on the Mixtral-
shaped model in 12 GiB: 15-44 ms of dense time per block against ~5 ms in RAM, and up to 1.7 GB per
token of reads that mer's own counters did not see). The router therefore reads each dense tensor
once, with plain sequential `pread`s, into anonymous memory that the RAM budget counts
(`mer.runtime.ram_budget.dense_nbytes`), and tells the kernel it no longer needs those file pages
(`POSIX_FADV_DONTNEED`), so they do not crowd the cgroup as page cache either.

Anonymous memory is only evicted to swap; on a host with swap the copies could still be swapped out
(mlock would need a memlock limit the size of the dense weights; mer does not lock them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np

from mer.errors import GGUFError
from mer.store.gguf_files import TensorData

READ_CHUNK = 64 * 2**20  # bytes per pread: large sequential reads, a bounded Python loop


def read_resident(tensors: Iterable[TensorData]) -> dict[str, TensorData]:
    """A resident copy of each tensor (by name), read from its file; the files' cached pages of those
    bytes are dropped afterwards. Errors name the file and tensor."""
    copies: dict[str, TensorData] = {}
    by_path: dict[str, list[TensorData]] = {}
    for tensor in tensors:
        by_path.setdefault(str(tensor.path), []).append(tensor)
    for path, group in by_path.items():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            for tensor in sorted(group, key=lambda t: t.offset):  # in file order: sequential reads
                copies[tensor.name] = dataclasses.replace(tensor, data=_read(descriptor, tensor))
            for tensor in group:
                os.posix_fadvise(descriptor, tensor.offset, tensor.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
    return copies


def _read(descriptor: int, tensor: TensorData) -> np.ndarray:
    copy = np.empty(tensor.nbytes, dtype=np.uint8)
    view, done = memoryview(copy), 0
    while done < tensor.nbytes:
        count = os.preadv(descriptor, [view[done : done + READ_CHUNK]], tensor.offset + done)
        if count <= 0:
            raise GGUFError(f"{tensor.path}: tensor {tensor.name} is cut short at byte {tensor.offset + done} "
                            f"(the file changed while it was read)")
        done += count
    return copy
