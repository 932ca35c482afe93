"""A cheap fingerprint of a GGUF model, and the file stat recorded beside it, to find a converted store
at start-up without reading the whole model.

The full identity (`mer.store.gguf_identity`, the manifest's `source.hash`) covers every byte of
tensor data: on a 26 GB model it costs a full read (~45 s at this disk's speed). The fingerprint
reads ~4 MiB per part, whatever the model's size.

Definition (the manifest's `source.fingerprint`): the lower-case hex SHA-256 of `SCHEME`, then for
each part of the model in order (one part for a single file)

    the part's size in bytes (8 bytes, big-endian),
    its header bytes [0, data_offset): magic, version, metadata, tensor infos (names, types,
        shapes, offsets): any change of model, quantization, shape or vocabulary shows here,
    and the bytes of the sampled blocks of its data region [data_offset, size), in order
        (`sampled_blocks`): the first and the last `BLOCK_NBYTES` of the region and
        `NUM_SAMPLES` blocks centred in `NUM_SAMPLES` equal slices of it, their starts rounded
        down to a 4096-byte page (no earlier than data_offset). A data region of at most
        (NUM_SAMPLES + 2) x BLOCK_NBYTES bytes is covered whole.

The numbers: 64 KiB blocks are one sequential request each for the disk (the cost of a block is
its seek, not its bytes; a page-aligned 64 KiB read is 16 pages, not 17); 64 slices put a sample in
every ~400 MB of a 26 GB model, and in every tensor larger than a slice, so a different model of
the same shape and header (another fine-tune, other random weights) differs in nearly every block
and is caught by the first one; the first and last blocks catch a file that was cut or extended in
place. 66 reads of 64 KiB cost ~4 MiB and 66 seeks: tens of milliseconds from a cold cache
(docs/store.md has the measured figure).

What the fingerprint does not see: a change of bytes outside the samples with the header and size
unchanged. That needs a rewrite of the file in place, which changes its modification time: the
stat recorded beside the fingerprint (size, mtime_ns, inode per part) sends such a start to the
full identity once (`mer.store.store_cache`), and the expert bytes of the store carry their own
checksums (`mer-pipeline store verify`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from mer.store.gguf_files import GGUFPart
from mer.store.manifest import SourceFileStat

SCHEME = b"mer-gguf-fingerprint-1"
BLOCK_NBYTES = 64 * 1024
NUM_SAMPLES = 64
PAGE_NBYTES = 4096


def sampled_blocks(data_offset: int, file_nbytes: int) -> list[tuple[int, int]]:
    """The (offset, length) of each block of a part that the fingerprint reads, in order."""
    region = file_nbytes - data_offset
    if region <= (NUM_SAMPLES + 2) * BLOCK_NBYTES:
        return [(data_offset, max(region, 0))]
    blocks = [(data_offset, BLOCK_NBYTES)]
    for index in range(NUM_SAMPLES):
        centre = data_offset + (2 * index + 1) * region // (2 * NUM_SAMPLES)
        start = max(data_offset, (centre - BLOCK_NBYTES // 2) // PAGE_NBYTES * PAGE_NBYTES)
        blocks.append((start, BLOCK_NBYTES))
    blocks.append((file_nbytes - BLOCK_NBYTES, BLOCK_NBYTES))
    return blocks


def gguf_fingerprint(parts: Sequence[GGUFPart]) -> str:
    """The fingerprint (see the module docstring) of a model opened with `mer.store.gguf_files`."""
    digest = hashlib.sha256(SCHEME)
    for part in parts:
        digest.update(part.nbytes.to_bytes(8, "big"))
        digest.update(part.header)
        with open(part.path, "rb", buffering=0) as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around the samples
            for offset, length in sampled_blocks(len(part.header), part.nbytes):
                block = os.pread(handle.fileno(), length, offset)
                if len(block) != length:
                    raise OSError(f"{part.path}: short read of {length} bytes at {offset} (file changed while read?)")
                digest.update(block)
    return digest.hexdigest()


def source_file_stats(paths: Sequence[str | os.PathLike]) -> tuple[SourceFileStat, ...]:
    """Size, modification time (ns) and inode of each file, as a manifest records them."""
    stats = (Path(path).stat() for path in paths)
    return tuple(SourceFileStat(stat.st_size, stat.st_mtime_ns, stat.st_ino) for stat in stats)
