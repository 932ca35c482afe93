"""`store verify` on real store files: every flipped payload byte is found and named; broken
stores give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mer.cli.main import main
from mer.errors import StoreError
from mer.store.manifest import Manifest
from mer.store.synth import SynthSpec, synth_store
from mer.store.verify import verify_store

# 3 layers x 4 experts of 13,824 payload bytes, each in a 16,384-byte stride (so with padding)
SPEC = SynthSpec(num_layers=3, experts_per_layer=4, top_k=2, d_model=64, d_ff=128, dtypes=("q4_0",) * 3, seed=21)
PAYLOAD_NBYTES = 13824


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return synth_store(SPEC, tmp_path_factory.mktemp("verify") / "store").out


def flip_byte(directory: Path, expert_id: int, position: int) -> None:
    """XOR one byte of an expert's payload (position counts from the payload's start)."""
    manifest = Manifest.load(directory)
    path = directory / manifest.layer_of(expert_id).file
    with open(path, "r+b") as handle:
        handle.seek(manifest.expert(expert_id).offset + position)
        value = handle.read(1)[0]
        handle.seek(-1, 1)
        handle.write(bytes([value ^ 0x10]))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_clean_store_verifies(store_dir, capsys):
    report = verify_store(store_dir)
    assert report.ok and report.bad == () and report.num_experts == 12 and report.nbytes == 12 * PAYLOAD_NBYTES
    code, out, _ = run_cli(capsys, "store", "verify", str(store_dir), "--json", "--quiet")
    assert code == 0
    assert json.loads(out) == {"ok": True, "bad": [], "experts": 12, "bytes": 12 * PAYLOAD_NBYTES}


def test_one_flipped_byte_in_any_expert_is_found(store_dir):
    rng = np.random.default_rng(5)
    for expert_id in range(12):
        for position in (0, PAYLOAD_NBYTES - 1, int(rng.integers(1, PAYLOAD_NBYTES - 1))):
            flip_byte(store_dir, expert_id, position)
            try:
                assert verify_store(store_dir).bad == (expert_id,), (expert_id, position)
            finally:
                flip_byte(store_dir, expert_id, position)  # flip back
    assert verify_store(store_dir).ok


@pytest.mark.parametrize("flips", [[(1, 0)], [(0, PAYLOAD_NBYTES - 1), (6, 500), (11, PAYLOAD_NBYTES - 1)]])
def test_cli_names_every_bad_expert_and_exits_1(store_dir, capsys, flips):
    for expert_id, position in flips:
        flip_byte(store_dir, expert_id, position)
    try:
        code, out, err = run_cli(capsys, "store", "verify", str(store_dir), "--json", "--quiet")
        text_code, text_out, _ = run_cli(capsys, "store", "verify", str(store_dir), "--quiet")
    finally:
        for expert_id, position in flips:
            flip_byte(store_dir, expert_id, position)
    bad = sorted(expert_id for expert_id, _ in flips)
    assert code == text_code == 1
    assert json.loads(out) == {"ok": False, "bad": bad, "experts": 12, "bytes": 12 * PAYLOAD_NBYTES}
    for expert_id in bad:
        name = f"layer {expert_id // 4} expert {expert_id % 4} (id {expert_id})"
        assert name in err and name in text_out
    assert f"{len(bad)} of 12 experts bad" in text_out


def test_padding_after_a_payload_is_not_checked(store_dir):
    flip_byte(store_dir, 2, PAYLOAD_NBYTES)  # first padding byte
    try:
        assert verify_store(store_dir).ok
    finally:
        flip_byte(store_dir, 2, PAYLOAD_NBYTES)


@pytest.fixture
def fresh_store(tmp_path) -> Path:
    return synth_store(SPEC, tmp_path / "store").out


def test_missing_payload_file(fresh_store, capsys):
    (fresh_store / "experts-001.bin").unlink()
    with pytest.raises(StoreError, match=r"experts-001\.bin: payload file listed in the manifest is missing"):
        verify_store(fresh_store)
    code, out, err = run_cli(capsys, "store", "verify", str(fresh_store), "--json")
    assert code == 1 and out == "" and "experts-001.bin" in err


def test_truncated_payload_file(fresh_store):
    path = fresh_store / "experts-002.bin"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1)
    with pytest.raises(StoreError, match=r"experts-002\.bin: .* manifest says .*truncated"):
        verify_store(fresh_store)


def test_malformed_manifest(fresh_store):
    manifest_path = fresh_store / "manifest.json"
    data = json.loads(manifest_path.read_text())
    del data["geometry"]["d_ff"]
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="malformed manifest"):
        verify_store(fresh_store)
    manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match="malformed manifest"):
        verify_store(fresh_store)


def test_manifest_of_another_version(fresh_store, capsys):
    manifest_path = fresh_store / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["mer_store"] = 99
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="store format version 99"):
        verify_store(fresh_store)
    code, _, err = run_cli(capsys, "store", "info", str(fresh_store))
    assert code == 1 and "store format version 99" in err


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no such store directory"):
        verify_store(tmp_path / "absent")
    with pytest.raises(StoreError, match="not an expert store"):
        verify_store(tmp_path)
