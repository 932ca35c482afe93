"""Start-up reads a few MiB of the model, not the model: the store lookup on a GGUF of ~370 MB.

The bytes are counted by the kernel: `read_bytes` of /proc/self/io (what this process made the
disk read; memory-mapped reads count, page-cache hits do not), with the model's pages evicted
from the page cache first (posix_fadvise DONTNEED of a file with no dirty or mapped pages). The
full identity, measured the same way, reads the whole file: that shows the counter works here.
Besides the fingerprint's samples, the kernel reads ahead around the header (the memory-mapped
parse and the first sample): up to the device's `read_ahead_kb` (8 MiB on this machine's disk)
each time, a constant that does not grow with the model.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from mer.store import gguf_identity
from mer.store.convert import convert_gguf
from mer.store.gguf_fingerprint import BLOCK_NBYTES, NUM_SAMPLES
from mer.store.store_cache import cached_store
from tests.support.streamed_gguf import write_streamed_moe_gguf


def disk_read_bytes() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if line)
    return int(fields["read_bytes"])


def evict_from_page_cache(path: Path) -> None:
    gc.collect()  # memory maps of earlier opens keep pages in the cache
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def readahead_nbytes(path: Path) -> int:
    """The block device's readahead window for `path` (sysfs `read_ahead_kb`; 128 KiB if unknown)."""
    device = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue in (base / "queue", base / ".." / "queue"):
        try:
            return int((queue / "read_ahead_kb").read_text()) * 1024
        except (OSError, ValueError):
            continue
    return 128 * 1024


def read_while(action, path: Path) -> int:
    evict_from_page_cache(path)
    before = disk_read_bytes()
    action()
    return disk_read_bytes() - before


def test_the_lookup_of_a_converted_store_reads_a_few_mib_of_a_large_model(tmp_path, monkeypatch):
    model = write_streamed_moe_gguf(tmp_path / "large.gguf", n_layers=6, d_model=1024, d_ff=4096).path
    size = model.stat().st_size
    assert size > 350 * 2**20
    cache = tmp_path / "cache"

    def convert(model, directory, force):
        convert_gguf(model, directory, force=force)

    def lookup():
        return cached_store(model, cache, convert=convert, announce=lambda line: None)

    store = lookup()
    full = read_while(lambda: gguf_identity.gguf_identity(model), model)
    if full == 0:
        pytest.skip("this filesystem does not account reads in /proc/self/io read_bytes")
    assert full >= 0.9 * size

    monkeypatch.setattr(gguf_identity, "gguf_identity", lambda paths: pytest.fail("the full identity was computed"))
    found = []
    lookup_bytes = read_while(lambda: found.append(lookup()), model)
    assert found == [store]
    samples, readahead = (NUM_SAMPLES + 2) * BLOCK_NBYTES, readahead_nbytes(model)
    print(f"lookup read {lookup_bytes} bytes of a {size}-byte model (samples: {samples} bytes, readahead window "
          f"{readahead}); the full identity read {full}")
    assert lookup_bytes <= samples + 3 * readahead + 2**20
    assert lookup_bytes < 0.1 * size
