"""Store files written and checked with O_DIRECT, with staging for unaligned payloads and a
buffered fallback, all give the same bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from mer.store import direct_io
from mer.store.direct_io import is_page_aligned, open_direct, page_aligned_empty
from mer.store.manifest import Manifest
from mer.store.synth import SynthSpec, synth_store
from tests.support.synth_payloads import expert_payload
from mer.store.verify import verify_store

# 13,824-byte payloads in 16,384-byte strides: never page-sized, so always staged under O_DIRECT
PADDED = SynthSpec(num_layers=2, experts_per_layer=3, top_k=1, d_model=64, d_ff=128, dtypes=("q4_0",) * 3, seed=8)
# 221,184-byte payloads (54 pages): written straight from synth's aligned buffers
PAGE_SIZED = SynthSpec.from_preset("tiny", num_layers=1, experts_per_layer=3, seed=8)


def store_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.bin"))}


def test_page_aligned_empty():
    for nbytes in (1, 4096, 13824):
        array = page_aligned_empty(nbytes)
        assert array.nbytes == nbytes and array.ctypes.data % 4096 == 0 and array.flags.writeable
    assert is_page_aligned(page_aligned_empty(8192)) and not is_page_aligned(page_aligned_empty(8192)[1:4097])


@pytest.mark.parametrize("spec", [PADDED, PAGE_SIZED], ids=["padded", "page-sized"])
def test_direct_and_buffered_writes_give_identical_stores(tmp_path, monkeypatch, spec):
    synth_store(spec, tmp_path / "direct")
    monkeypatch.setattr(direct_io, "DIRECT_FLAG", 0)
    synth_store(spec, tmp_path / "buffered")
    assert verify_store(tmp_path / "buffered").ok
    direct = store_bytes(tmp_path / "direct")
    assert direct == store_bytes(tmp_path / "buffered")
    manifest = Manifest.load(tmp_path / "direct")
    for entry in manifest.experts:
        layer = manifest.layers[entry.moe_layer]
        data = direct[layer.file][entry.offset : entry.offset + layer.expert_stride]
        payload_nbytes = layer.format.payload_nbytes
        assert data[:payload_nbytes] == expert_payload(spec, entry.id).tobytes()
        assert data[payload_nbytes:] == bytes(layer.expert_stride - payload_nbytes)  # zero padding


def test_open_direct_falls_back_when_the_filesystem_refuses(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, mode=0o777):
        if flags & direct_io.DIRECT_FLAG:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing_open)
    fd, is_direct = open_direct(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    assert not is_direct
    synth_store(PADDED, tmp_path / "store")
    assert verify_store(tmp_path / "store").ok


def test_other_open_errors_are_not_swallowed(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_direct(tmp_path / "absent" / "file", os.O_RDONLY)
