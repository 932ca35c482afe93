"""The read path's checksum: ISA-L's crc32 equals zlib's, and the I/O worker's checker checks the reads
it should, in its helper thread, and names the expert, file and offset of a mismatch."""

from __future__ import annotations

import asyncio
import re
import zlib

import numpy as np
import pytest

from mer.errors import PayloadChecksumError
from mer.io.payload_check import PayloadChecker
from mer.store.checksum import CRC32_IMPLEMENTATION, crc32, payload_checksum
from mer.store.reader import ExpertStore
from mer.store.synth import SynthSpec, synth_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    spec = SynthSpec(num_layers=2, experts_per_layer=4, top_k=2, d_model=64, d_ff=128, dtypes=("q8_0",) * 3, seed=3)
    return ExpertStore.open(synth_store(spec, tmp_path_factory.mktemp("store") / "store").out)


def test_crc32_is_zlibs_whole_and_in_pieces():
    data = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
    assert CRC32_IMPLEMENTATION == "isal"  # a dependency: the fallback is zlib itself
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[12345:], crc32(data[:12345])) == zlib.crc32(data)
    assert payload_checksum(b"") == "00000000" and payload_checksum(data) == f"{zlib.crc32(data):08x}"


def check(checker: PayloadChecker, expert_id: int, payload: np.ndarray) -> float:
    async def checked():
        checksum, check_us = await checker.start(memoryview(payload))
        checker.finish(expert_id, checksum, check_us)
        return check_us

    return asyncio.run(checked())


def test_each_expert_is_checked_once_unless_every_read(store):
    checker = PayloadChecker(store.manifest, store.directory, every_read=False)
    try:
        assert checker.needs_check(5)
        assert check(checker, 5, store.read_payload(5).data) > 0
        assert not checker.needs_check(5) and checker.needs_check(4)
        every = PayloadChecker(store.manifest, store.directory, every_read=True)
        check(every, 5, store.read_payload(5).data)
        assert every.needs_check(5)
        every.close()
        figures = checker.figures()
        assert figures["checks"] == 1 and figures["failures"] == 0 and figures["experts_verified"] == 1
        assert figures["nbytes"] == store.manifest.layer_of(5).format.payload_nbytes
    finally:
        checker.close()


def test_a_mismatch_names_expert_file_and_offset_and_is_checked_again(store):
    checker = PayloadChecker(store.manifest, store.directory, every_read=False)
    try:
        check(checker, 6, store.read_payload(6).data)
        payload = store.read_payload(6).data.copy()
        payload[100] ^= 1
        entry = store.manifest.expert(6)
        expected = (f"layer 1 expert 2 (id 6): checksum mismatch in {store.directory / 'experts-001.bin'} "
                    f"at offset {entry.offset} ({payload.nbytes} bytes): crc32 {payload_checksum(payload)}, "
                    f"the manifest says {entry.checksum}")
        with pytest.raises(PayloadChecksumError, match=re.escape(expected)):
            check(checker, 6, payload)
        assert checker.needs_check(6)  # no longer trusted: its next read is checked
        assert checker.figures()["failures"] == 1
    finally:
        checker.close()
