"""Shard stores (`convert --shard i/N`, `store shard`): a tiny MoE GGUF written with the `gguf` library,
converted whole once and per shard; the shards' payloads are compared byte for byte with the whole
store's, their manifests with the shard map, and an expert outside a shard must fail naming it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import mer.store.writer
from mer.cli.main import main
from mer.cluster.shard_balance import balanced_map, uniform_map
from mer.cluster.shard_map import shard_map_hash, write_shard_map
from mer.config import PipelineConfig
from mer.errors import ConfigError, RemoteError, ShardMapError, StoreError
from mer.store.convert import convert_gguf
from mer.store.manifest import Manifest
from mer.store.reader import ExpertStore
from mer.store.shard_choice import parse_shard
from mer.store.shard_copy import copy_shard
from mer.store.verify import verify_store
from tests.support.corrupt_data import flip_byte
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.io_service import run_io_service

# 3 blocks (the first dense), 2 MoE layers of 5 experts with mixed dtypes: 10 experts, shards uneven
MODEL = dict(arch="llama", dense_first_layer=True, n_layers=3, n_experts=5, d_model=64, d_ff=128,
             dtypes=("q4_0", "q8_0", "f16"))
LAYERS, PER_LAYER = 2, 5


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(gguf info, the whole store) converted once for the module."""
    directory = tmp_path_factory.mktemp("shards")
    info = write_tiny_moe_gguf(directory / "model.gguf", **MODEL)
    convert_gguf(info.path, directory / "whole")
    return info, ExpertStore.open(directory / "whole")


def payload_bytes(store: ExpertStore, expert_id: int) -> bytes:
    return store.read_payload(expert_id).data.tobytes()


def test_uniform_shards_hold_every_expert_once_with_the_whole_stores_bytes(whole, tmp_path):
    info, full = whole
    shard_map = uniform_map(LAYERS, PER_LAYER, 3)
    held = Counter()
    for index in range(3):
        result = convert_gguf(info.path, tmp_path / f"s{index}", shard=(index, 3))
        store = ExpertStore.open(tmp_path / f"s{index}")
        manifest = store.manifest
        shard = manifest.shard
        assert (shard.index, shard.count, shard.replicas) == (index, 3, 1)
        assert shard.map_hash == shard_map_hash(shard_map) and len(shard.map_hash) == 64
        assert list(shard.experts) == shard_map.experts_of(index) == [e.id for e in manifest.experts]
        assert result.num_experts == len(shard.experts) and result.shard == shard
        # everything else as the whole store: geometry, layer formats and blocks, the GGUF's identity
        assert manifest.geometry == full.manifest.geometry and manifest.layers == full.manifest.layers
        assert manifest.source.hash == full.manifest.source.hash and manifest.source.hash
        for expert_id in shard.experts:
            assert payload_bytes(store, expert_id) == payload_bytes(full, expert_id)
            assert manifest.expert(expert_id).checksum == full.manifest.expert(expert_id).checksum
        # compact files: each layer file holds only the layer's held experts
        for layer, entry in zip(manifest.layers, manifest.files):
            count = sum(expert_id // PER_LAYER == layer.moe_layer for expert_id in shard.experts)
            assert entry.nbytes == (tmp_path / f"s{index}" / entry.name).stat().st_size == count * layer.expert_stride
        report = verify_store(tmp_path / f"s{index}")
        assert report.ok and report.num_experts == len(shard.experts)
        assert report.nbytes == result.nbytes == sum(manifest.layer_of(e).format.payload_nbytes for e in shard.experts)
        held.update(shard.experts)
    assert held == Counter(range(LAYERS * PER_LAYER))  # every expert exactly once
    assert "shard" not in json.loads((full.directory / "manifest.json").read_text())  # whole stores unchanged


def test_a_map_with_replicas_puts_each_expert_on_r_shards(whole, tmp_path):
    info, full = whole
    frequencies = np.random.default_rng(3).integers(0, 50, LAYERS * PER_LAYER)
    shard_map = balanced_map(frequencies, LAYERS, PER_LAYER, 3, replicas=2)
    write_shard_map(tmp_path / "map.json", shard_map)
    held = Counter()
    for index in range(3):
        convert_gguf(info.path, tmp_path / f"s{index}", shard=(index, 3), shard_map=tmp_path / "map.json")
        store = ExpertStore.open(tmp_path / f"s{index}")
        assert store.manifest.shard.map_hash == shard_map_hash(shard_map) != shard_map_hash(uniform_map(2, 5, 3))
        assert store.manifest.shard.replicas == 2
        assert list(store.manifest.shard.experts) == shard_map.experts_of(index)
        assert all(payload_bytes(store, e) == payload_bytes(full, e) for e in store.manifest.shard.experts)
        held.update(store.manifest.shard.experts)
    assert held == Counter({expert: 2 for expert in range(LAYERS * PER_LAYER)})


def test_an_expert_outside_the_shard_is_a_clear_error(whole, tmp_path):
    info, _ = whole
    convert_gguf(info.path, tmp_path / "s1", shard=(1, 3))
    store = ExpertStore.open(tmp_path / "s1")
    assert not store.manifest.holds(0) and store.manifest.holds(1)
    message = r"layer 0 expert 0 \(id 0\) is not in this store: it holds only the 3 experts of shard 1/3"
    with pytest.raises(StoreError, match=message):
        store.read_payload(0)
    with pytest.raises(StoreError, match="out of range"):
        store.manifest.expert(10)


def test_the_io_worker_of_a_shard_store_refuses_an_expert_it_does_not_hold(whole, tmp_path, leak_guard):
    info, full = whole
    convert_gguf(info.path, tmp_path / "s0", shard=(0, 2))  # experts 0, 2, 4, 6, 8
    config = PipelineConfig(store=tmp_path / "s0", cache_slots=4, compute_workers=1, prefetch=False)

    async def scenario(service, client):
        grants = await client.acquire(0, [2, 6])
        slots = [bytes(service.arena.slot_view(grant.slot)[: len(payload_bytes(full, grant.expert_id))])
                 for grant in grants]
        await client.release([grant.ref for grant in grants])
        refused = re.escape("layer 0 expert 3 (id 3) is not in this store") + ".*shard 0/2"
        with pytest.raises(RemoteError, match=refused):
            await client.acquire(1, [4, 3])
        after = await client.acquire(2, [4, 8])  # refused before any slot was taken: the worker serves on
        assert [grant.expert_id for grant in after] == [4, 8]
        await client.release([grant.ref for grant in after])
        return [(grant.expert_id, data) for grant, data in zip(grants, slots)]

    loaded = run_io_service(leak_guard, config, tmp_path, scenario)
    assert [expert for expert, _ in loaded] == [2, 6]
    assert all(data == payload_bytes(full, expert) for expert, data in loaded)


@pytest.mark.parametrize("text, named", [("3/3", "index i is 3"), ("1/0", "count N is 0"), ("-1/2", "i/N"),
                                         ("a/b", "i/N"), ("1", "i/N"), ("0/2/1", "i/N")])
def test_bad_shard_values_are_refused_naming_the_value(text, named):
    with pytest.raises(ConfigError, match=re.escape(f"--shard {text!r}") + ".*" + re.escape(named)):
        parse_shard(text)


def test_parse_shard_accepts_the_valid_forms():
    assert parse_shard("0/1") == (0, 1) and parse_shard("2/3") == (2, 3)


@pytest.mark.parametrize("shard_map, shard, field", [
    (uniform_map(LAYERS, PER_LAYER + 1, 2), (0, 2), "experts_per_layer"),
    (uniform_map(LAYERS + 1, PER_LAYER, 2), (0, 2), "layers"),
    (uniform_map(LAYERS, PER_LAYER, 2), (0, 3), "num_shards"),
])
def test_a_map_that_does_not_fit_the_model_is_refused_naming_the_field(whole, tmp_path, shard_map, shard, field):
    info, _ = whole
    write_shard_map(tmp_path / "map.json", shard_map)
    with pytest.raises(ShardMapError, match=re.escape(f"{tmp_path / 'map.json'}: field {field!r}")):
        convert_gguf(info.path, tmp_path / "out", shard=shard, shard_map=tmp_path / "map.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["map.json"]


def test_an_interrupted_shard_conversion_leaves_nothing(whole, tmp_path, monkeypatch):
    info, _ = whole
    written = []
    original = mer.store.writer.StoreWriter.write_expert

    def failing(self, expert_id, payload):
        if written:
            raise OSError(5, "Input/output error")
        written.append(expert_id)
        original(self, expert_id, payload)

    monkeypatch.setattr(mer.store.writer.StoreWriter, "write_expert", failing)
    with pytest.raises(StoreError, match="cannot write the store"):
        convert_gguf(info.path, tmp_path / "s0", shard=(0, 2))
    assert written and list(tmp_path.iterdir()) == []


def test_a_manifest_whose_shard_list_disagrees_with_its_experts_is_refused(whole, tmp_path):
    info, _ = whole
    convert_gguf(info.path, tmp_path / "s0", shard=(0, 2))
    path = tmp_path / "s0" / "manifest.json"
    data = json.loads(path.read_text())
    data["shard"]["experts"] = [0, 2, 4, 6, 9]
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match=r"experts\[4\] is .* expected id 9"):
        Manifest.load(tmp_path / "s0")
    data["shard"]["index"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match=r"shard.index is 2, not in 0..1"):
        Manifest.load(tmp_path / "s0")


def test_store_shard_copies_what_convert_shard_writes(whole, tmp_path):
    info, full = whole
    converted = convert_gguf(info.path, tmp_path / "converted", shard=(2, 3))
    copied = copy_shard(full.directory, tmp_path / "copied", (2, 3))
    assert (copied.num_experts, copied.nbytes) == (converted.num_experts, converted.nbytes)
    assert copied.shard == converted.shard
    assert Manifest.load(tmp_path / "copied") == Manifest.load(tmp_path / "converted")
    for entry in Manifest.load(tmp_path / "copied").files:
        assert (tmp_path / "copied" / entry.name).read_bytes() == (tmp_path / "converted" / entry.name).read_bytes()
    with pytest.raises(StoreError, match=r"lacks 4 experts of shard 0/3 .*first: layer 0 expert 0 \(id 0\)"):
        copy_shard(tmp_path / "copied", tmp_path / "again", (0, 3))


def test_store_shard_refuses_a_corrupt_source_expert(whole, tmp_path):
    import shutil

    _, full = whole
    shutil.copytree(full.directory, tmp_path / "full")
    flip_byte(tmp_path / "full", 4)
    with pytest.raises(StoreError, match=re.escape("layer 0 expert 4 (id 4) does not match its checksum")):
        copy_shard(tmp_path / "full", tmp_path / "s1", (1, 3))  # 1, 4, 7
    assert not (tmp_path / "s1").exists()


def cli(capsys, *args) -> tuple[int, str, str]:
    """The real CLI (`mer.cli.main.main`) in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_cli_converts_describes_verifies_and_copies_a_shard(whole, tmp_path, capsys):
    info, full = whole
    converted = subprocess.run([sys.executable, "-m", "mer.cli.main", "convert", str(info.path), "--out",
                                str(tmp_path / "s1"), "--shard", "1/2", "--json", "--quiet"],
                               capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["shard"] == "1/2" and json.loads(converted.stdout)["experts"] == 5
    status, out, err = cli(capsys, "store", "info", tmp_path / "s1")
    assert status == 0, err
    expected_hash = shard_map_hash(uniform_map(LAYERS, PER_LAYER, 2))[:16]
    assert f"shard       1/2: 5 of 10 experts (shard map {expected_hash}, 1 replica per expert)" in out
    status, out, err = cli(capsys, "store", "info", tmp_path / "s1", "--json")
    assert json.loads(out)["shard"] == {"index": 1, "count": 2, "map_hash": shard_map_hash(uniform_map(2, 5, 2)),
                                        "replicas": 1, "experts": 5}
    status, out, err = cli(capsys, "store", "verify", tmp_path / "s1", "--json", "--quiet")
    assert status == 0 and json.loads(out) == {
        "ok": True, "bad": [], "experts": 5, "bytes": ExpertStore.open(tmp_path / "s1").manifest.total_payload_nbytes()}
    flip_byte(tmp_path / "s1", 7)
    status, out, err = cli(capsys, "store", "verify", tmp_path / "s1", "--quiet")
    assert status == 1 and "checksum mismatch: layer 1 expert 2 (id 7)" in err
    status, out, err = cli(capsys, "convert", info.path, "--out", tmp_path / "bad", "--shard", "2/2")
    assert status != 0 and "--shard '2/2'" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    status, out, err = cli(capsys, "store", "shard", "--store", full.directory, "--out", tmp_path / "c1",
                           "--shard", "1/2", "--json", "--quiet")
    assert status == 0, err
    assert json.loads(out)["experts"] == 5 and verify_store(tmp_path / "c1").ok
    assert Manifest.load(tmp_path / "c1").shard == Manifest.load(tmp_path / "s1").shard
