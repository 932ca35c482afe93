"""The GGUF fingerprint: what it reads, and that a changed header, sampled block or size changes it."""

from __future__ import annotations

import os
import shutil

import pytest

from mer.store.gguf_files import open_parts
from mer.store.gguf_fingerprint import BLOCK_NBYTES, NUM_SAMPLES, PAGE_NBYTES, gguf_fingerprint, sampled_blocks
from mer.store.manifest import SourceFileStat
from mer.store.gguf_fingerprint import source_file_stats
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.streamed_gguf import write_streamed_moe_gguf


def fingerprint(path) -> str:
    return gguf_fingerprint(open_parts(path))


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


@pytest.fixture(scope="module")
def sampled_model(tmp_path_factory):
    """A model whose data region (~7 MB) is larger than the samples, so that some bytes are not read."""
    return write_streamed_moe_gguf(tmp_path_factory.mktemp("fingerprint") / "m.gguf", n_layers=2, d_model=256,
                                   d_ff=1024)


def test_blocks_cover_a_small_data_region_whole():
    assert sampled_blocks(1000, 1000 + 5) == [(1000, 5)]
    limit = (NUM_SAMPLES + 2) * BLOCK_NBYTES
    assert sampled_blocks(4096, 4096 + limit) == [(4096, limit)]
    assert sampled_blocks(64, 64) == [(64, 0)]


@pytest.mark.parametrize("data_offset, file_nbytes", [(9120, 9120 + 7 * 2**20 + 3), (4096, 26 * 10**9), (123, 2**33)])
def test_blocks_of_a_large_region(data_offset, file_nbytes):
    blocks = sampled_blocks(data_offset, file_nbytes)
    assert len(blocks) == NUM_SAMPLES + 2
    assert blocks[0] == (data_offset, BLOCK_NBYTES) and blocks[-1] == (file_nbytes - BLOCK_NBYTES, BLOCK_NBYTES)
    middle = blocks[1:-1]
    assert all(length == BLOCK_NBYTES and start % PAGE_NBYTES == 0 for start, length in middle)
    assert all(data_offset <= start and start + length <= file_nbytes for start, length in blocks)
    starts = [start for start, _ in blocks]
    assert starts == sorted(starts)
    region = file_nbytes - data_offset
    slice_nbytes = region / NUM_SAMPLES
    for index, (start, _) in enumerate(middle):  # one block in each of the equal slices, near its centre
        centre = data_offset + (index + 0.5) * slice_nbytes
        assert abs(start + BLOCK_NBYTES / 2 - centre) <= PAGE_NBYTES
    assert sum(length for _, length in blocks) == (NUM_SAMPLES + 2) * BLOCK_NBYTES


def test_same_bytes_same_fingerprint_anywhere(tmp_path, sampled_model):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(sampled_model.path, copy)
    value = fingerprint(sampled_model.path)
    assert len(value) == 64 and int(value, 16) >= 0
    assert fingerprint(copy) == value == fingerprint(sampled_model.path)


def test_a_changed_header_byte_changes_it(tmp_path, sampled_model):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(sampled_model.path, copy)
    name_offset = copy.read_bytes().index(b"tiny-llama-moe")
    with open(copy, "r+b") as handle:  # the model's name: still a valid GGUF, same size, same data
        handle.seek(name_offset + 5)
        handle.write(b"L")
    assert open_parts(copy)[0].value("general.name") == "tiny-Llama-moe"
    assert fingerprint(copy) != fingerprint(sampled_model.path)


def test_a_changed_byte_in_each_sampled_block_changes_it_and_elsewhere_not(tmp_path, sampled_model):
    reference = fingerprint(sampled_model.path)
    part = open_parts(sampled_model.path)[0]
    blocks = sampled_blocks(len(part.header), part.nbytes)
    assert len(blocks) == NUM_SAMPLES + 2
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(sampled_model.path, copy)
    for start, length in (blocks[0], blocks[1], blocks[NUM_SAMPLES // 2], blocks[-1]):
        for offset in (start, start + length - 1):
            flip_byte(copy, offset)
            assert fingerprint(copy) != reference, (start, offset)
            flip_byte(copy, offset)
            assert fingerprint(copy) == reference
    unsampled = blocks[1][0] + BLOCK_NBYTES + 10  # between two samples: the stats guard it (tests/unit/test_store_cache.py)
    assert all(not start <= unsampled < start + length for start, length in blocks)
    flip_byte(copy, unsampled)
    assert fingerprint(copy) == reference


def test_a_changed_size_changes_it(tmp_path, sampled_model):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(sampled_model.path, copy)
    with open(copy, "ab") as handle:
        handle.write(bytes(32))  # trailing bytes the reader ignores
    assert open_parts(copy)[0].nbytes == os.path.getsize(sampled_model.path) + 32
    assert fingerprint(copy) != fingerprint(sampled_model.path)


def test_a_small_model_is_covered_whole(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "tiny.gguf")
    reference = fingerprint(info.path)
    part = open_parts(info.path)[0]
    flip_byte(info.path, len(part.header) + (part.nbytes - len(part.header)) // 3)
    assert fingerprint(info.path) != reference


def test_split_parts_each_count(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "split.gguf", split=2)
    reference = fingerprint(info.path)
    assert fingerprint(info.paths[1]) == reference  # any part names the model
    last = info.paths[1]
    flip_byte(last, os.path.getsize(last) - 1)
    assert fingerprint(info.path) != reference


def test_stats_are_size_mtime_and_inode(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    os.utime(path, ns=(1_000_000_000_123, 2_000_000_000_456))
    assert source_file_stats([path]) == (SourceFileStat(10, 2_000_000_000_456, path.stat().st_ino),)
