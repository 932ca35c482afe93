"""Finding a GGUF's converted store at start-up by its fingerprint (`mer.store.store_cache`).

Real GGUFs written with `gguf`, real conversions into a cache directory in tmp_path. Whether the
full identity was computed is counted through `mer.store.gguf_identity.gguf_identity` (wrapped,
not replaced: it still computes), conversions through the `convert` callback.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mer.store import gguf_identity
from mer.store.convert import convert_gguf
from mer.store.gguf_files import open_parts
from mer.store.gguf_fingerprint import gguf_fingerprint, sampled_blocks, source_file_stats
from mer.store.manifest import MANIFEST_NAME, Manifest
from mer.store.store_cache import STORES_DIRECTORY, cached_store, store_directory_name
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.streamed_gguf import write_streamed_moe_gguf


class Lookups:
    """`cached_store` with counted conversions, identity computations and announcements."""

    def __init__(self, cache_dir: Path, monkeypatch):
        self.cache_dir = cache_dir
        self.conversions: list[tuple[Path, Path, bool]] = []
        self.identities: list[list[Path]] = []
        self.announced: list[str] = []
        self.full_identity = original = gguf_identity.gguf_identity

        def counted_identity(paths):
            self.identities.append(list(paths))
            return original(paths)

        monkeypatch.setattr(gguf_identity, "gguf_identity", counted_identity)

    def convert(self, model: Path, directory: Path, force: bool) -> None:
        self.conversions.append((model, directory, force))
        convert_gguf(model, directory, force=force)

    def find(self, model: Path) -> Path:
        self.conversions.clear(), self.identities.clear(), self.announced.clear()
        return cached_store(model, self.cache_dir, convert=self.convert, announce=self.announced.append)


@pytest.fixture
def lookups(tmp_path, monkeypatch):
    return Lookups(tmp_path / "cache", monkeypatch)


@pytest.fixture
def model(tmp_path):
    """A model larger than the fingerprint's samples (~7 MB of data), so that some bytes are not sampled."""
    return write_streamed_moe_gguf(tmp_path / "model.gguf", n_layers=2, d_model=256, d_ff=1024).path


NUM_SAMPLED_MIDDLE = 33  # a sampled block in the middle of the data region


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


def recorded_source(store: Path) -> dict:
    return json.loads((store / MANIFEST_NAME).read_text())["source"]


def test_first_use_converts_and_records_fingerprint_and_stats(lookups, model):
    store = lookups.find(model)
    fingerprint = gguf_fingerprint(open_parts(model))
    assert store == lookups.cache_dir / STORES_DIRECTORY / store_directory_name(model, fingerprint)
    assert store.name == f"model-{fingerprint[:16]}"
    assert lookups.conversions == [(model, store, False)] and lookups.identities == []
    assert lookups.announced == [f"converting {model} to {store}"]
    source = Manifest.load(store).source
    assert source.fingerprint == fingerprint and source.stats == source_file_stats([model])
    assert source.hash == lookups.full_identity(model)


def test_a_shard_store_of_the_model_is_never_taken_for_its_cached_store(lookups, model):
    named = lookups.cache_dir / STORES_DIRECTORY / store_directory_name(model, gguf_fingerprint(open_parts(model)))
    convert_gguf(model, named, shard=(0, 2))  # same source fingerprint and stats, half the experts
    store = lookups.find(model)
    assert store == named and lookups.conversions == [(model, named, True)]
    manifest = Manifest.load(store)
    assert manifest.shard is None and len(manifest.experts) == manifest.geometry.num_experts


def test_a_converted_store_is_reused_without_the_full_identity(lookups, model):
    store = lookups.find(model)
    manifest_before = (store / MANIFEST_NAME).read_bytes()
    for _ in range(2):
        assert lookups.find(model) == store
        assert lookups.conversions == [] and lookups.identities == [] and lookups.announced == []
    assert (store / MANIFEST_NAME).read_bytes() == manifest_before  # nothing rewritten


def make_older_store(store: Path) -> Path:
    """Turn a store into one an older mer wrote: no fingerprint or stats, named by the full identity."""
    data = json.loads((store / MANIFEST_NAME).read_text())
    for key in ("fingerprint", "stats"):
        del data["source"][key]
    (store / MANIFEST_NAME).write_text(json.dumps(data, indent=1))
    older = store.with_name(f"{store.name.split('-')[0]}-{data['source']['hash'][:16]}")
    store.rename(older)
    return older


def test_an_older_store_is_verified_once_and_upgraded(lookups, model):
    older = make_older_store(lookups.find(model))
    assert Manifest.load(older).source.fingerprint == "" and Manifest.load(older).source.stats == ()
    assert lookups.find(model) == older
    assert lookups.conversions == [] and len(lookups.identities) == 1
    assert len(lookups.announced) == 1 and "converted by an older mer, without a fingerprint" in lookups.announced[0]
    assert "checking the full identity" in lookups.announced[0]
    source = Manifest.load(older).source
    assert source.fingerprint == gguf_fingerprint(open_parts(model)) and source.stats == source_file_stats([model])
    assert not list(older.parent.glob(".*"))  # the manifest was replaced by a rename, no temporary left
    assert lookups.find(model) == older  # from now on: by the fingerprint
    assert lookups.conversions == [] and lookups.identities == [] and lookups.announced == []


def test_an_older_store_of_a_different_model_is_left_alone(lookups, model, tmp_path):
    older = make_older_store(lookups.find(model))
    manifest_before = (older / MANIFEST_NAME).read_bytes()
    (tmp_path / "other").mkdir()
    other = write_streamed_moe_gguf(tmp_path / "other" / "model.gguf", n_layers=2, d_model=256, d_ff=1024, seed=1).path
    assert os.path.getsize(other) == os.path.getsize(model)  # a candidate: same name, same size
    store = lookups.find(other)
    assert store != older and len(lookups.identities) == 1 and len(lookups.conversions) == 1
    assert (older / MANIFEST_NAME).read_bytes() == manifest_before


def test_a_touched_file_is_checked_once_in_full(lookups, model):
    store = lookups.find(model)
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert lookups.find(model) == store
    assert lookups.conversions == [] and len(lookups.identities) == 1
    assert len(lookups.announced) == 1 and "was modified, touched or copied" in lookups.announced[0]
    assert Manifest.load(store).source.stats == source_file_stats([model])
    assert lookups.find(model) == store
    assert lookups.conversions == [] and lookups.identities == []


def test_a_copy_elsewhere_is_checked_once_and_then_reused(lookups, model, tmp_path):
    store = lookups.find(model)
    copy = tmp_path / "elsewhere" / "model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(model, copy)
    assert lookups.find(copy) == store and len(lookups.identities) == 1 and lookups.conversions == []
    assert Manifest.load(store).source.paths == (str(copy.resolve()),)
    assert lookups.find(copy) == store and lookups.identities == []


def test_a_rewrite_outside_the_samples_is_caught_by_the_stats_and_converted_anew(lookups, model):
    store = lookups.find(model)
    part = open_parts(model)[0]
    blocks = sampled_blocks(len(part.header), part.nbytes)
    unsampled = blocks[1][0] + blocks[1][1] + 100
    assert all(not start <= unsampled < start + length for start, length in blocks)
    hash_before = Manifest.load(store).source.hash
    flip_byte(model, unsampled)  # the fingerprint is the same, the mtime is not
    assert lookups.find(model) == store
    assert len(lookups.identities) == 1 and lookups.conversions == [(model, store, True)]
    source = Manifest.load(store).source
    assert source.hash != hash_before and source.hash == lookups.full_identity(model)
    assert source.stats == source_file_stats([model])


def test_a_changed_sampled_block_is_a_different_model_even_with_the_old_stats(lookups, model):
    store = lookups.find(model)
    stat = model.stat()
    part = open_parts(model)[0]
    start, length = sampled_blocks(len(part.header), part.nbytes)[NUM_SAMPLED_MIDDLE]
    flip_byte(model, start + length // 2)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the stats as recorded: only the sample differs
    assert source_file_stats([model]) == Manifest.load(store).source.stats
    new_store = lookups.find(model)
    assert new_store != store and lookups.identities == [] and lookups.conversions == [(model, new_store, False)]
    assert Manifest.load(new_store).source.hash != Manifest.load(store).source.hash


def test_a_different_model_is_converted_anew(lookups, model, tmp_path):
    store = lookups.find(model)
    other = write_tiny_moe_gguf(tmp_path / "other.gguf", seed=3).path
    other_store = lookups.find(other)
    assert other_store != store and other_store.name.startswith("other-")
    assert lookups.identities == [] and lookups.conversions == [(other, other_store, False)]
    assert lookups.find(model) == store and lookups.conversions == []


def test_a_broken_store_under_the_fingerprint_name_is_replaced(lookups, model):
    store = lookups.find(model)
    (store / MANIFEST_NAME).write_text("{not json")
    assert lookups.find(model) == store
    assert lookups.conversions == [(model, store, True)]
    assert Manifest.load(store).source.fingerprint == gguf_fingerprint(open_parts(model))


def test_a_manifest_without_fingerprint_and_stats_loads(lookups, model):
    store = lookups.find(model)
    data = json.loads((store / MANIFEST_NAME).read_text())
    del data["source"]["fingerprint"], data["source"]["stats"]
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.source.fingerprint == "" and manifest.source.stats == ()
    assert manifest.source.hash == Manifest.load(store).source.hash
