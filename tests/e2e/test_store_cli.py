"""The `mer-pipeline synth` and `mer-pipeline store` commands, run as real subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mer.store.manifest import Manifest

MER_PIPELINE = shutil.which("mer-pipeline", path=str(Path(sys.executable).parent)) or "mer-pipeline"
TINY_PAYLOAD_NBYTES = 3 * 256 * 512 // 32 * 18  # 221,184: q4_0, d_model 256, d_ff 512


def mer(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, *map(str, argv)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = mer("synth", "--preset", "tiny", "--seed", "5", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["experts"] == 16
    assert summary["bytes"] == summary["payload_bytes"] == 16 * TINY_PAYLOAD_NBYTES
    assert summary["seconds"] > 0
    return out


def test_synth_with_explicit_flags_is_deterministic(tmp_path, tiny_store):
    flags = ["--layers", "2", "--experts", "8", "--top-k", "2", "--d-model", "256", "--d-ff", "512",
             "--dtype", "q4_0", "--seed", "5", "--quiet"]
    result = mer("synth", *flags, "--out", tmp_path / "same")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote 16 experts ({16 * TINY_PAYLOAD_NBYTES:,} bytes) to {tmp_path / 'same'}")
    for name in ("experts-000.bin", "experts-001.bin"):
        assert (tmp_path / "same" / name).read_bytes() == (tiny_store / name).read_bytes()


def test_store_info(tiny_store):
    result = mer("store", "info", tiny_store, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["geometry"] == {"architecture": "synth", "num_layers": 2, "num_moe_layers": 2,
                                "experts_per_layer": 8, "top_k": 2, "d_model": 256, "d_ff": 512}
    assert info["layer_groups"] == [{"first_layer": 0, "last_layer": 1,
                                     "dtypes": {"gate": "q4_0", "up": "q4_0", "down": "q4_0"},
                                     "layouts": {"gate": "native", "up": "native", "down": "native"},
                                     "payload_nbytes": TINY_PAYLOAD_NBYTES, "expert_stride": TINY_PAYLOAD_NBYTES}]
    assert info["slot_nbytes"] == TINY_PAYLOAD_NBYTES and info["layout"] == "native"
    assert info["total_payload_nbytes"] == info["total_file_nbytes"] == 16 * TINY_PAYLOAD_NBYTES
    assert info["source"]["kind"] == "synth" and info["source"]["parameters"]["seed"] == 5
    assert info["source"]["parameters"]["preset"] == "tiny"

    text = mer("store", "info", tiny_store)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert any(line.startswith("dtypes") and "layers 0-1: gate q4_0, up q4_0, down q4_0" in line for line in lines)
    assert any(line.startswith("expert") and "221,184 payload bytes" in line for line in lines)
    assert "8 experts per layer (16 in all), top-2, d_model 256, d_ff 512" in text.stdout
    assert "layout native" in text.stdout and "seed 5" in text.stdout


def test_store_verify_ok_then_bad(tiny_store):
    result = mer("store", "verify", tiny_store, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "bad": [], "experts": 16, "bytes": 16 * TINY_PAYLOAD_NBYTES}

    manifest = Manifest.load(tiny_store)
    entry = manifest.expert(13)  # layer 1 expert 5
    path = tiny_store / manifest.layer_of(13).file
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[entry.offset + TINY_PAYLOAD_NBYTES - 1] ^= 0x01  # the payload's last byte
    path.write_bytes(bytes(damaged))
    try:
        result = mer("store", "verify", tiny_store, "--json")
    finally:
        path.write_bytes(original)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"ok": False, "bad": [13], "experts": 16, "bytes": 16 * TINY_PAYLOAD_NBYTES}
    assert "layer 1 expert 5 (id 13)" in result.stderr


def test_synth_refuses_existing_output_without_force(tiny_store):
    result = mer("synth", "--preset", "tiny", "--out", tiny_store, "--json")
    assert result.returncode == 1 and result.stdout == ""
    assert "already exists (use --force" in result.stderr


def test_synth_errors_name_the_value(tmp_path):
    result = mer("synth", "--preset", "tiny", "--d-model", "100", "--out", tmp_path / "x")
    assert result.returncode == 1 and "d_model 100 is not a positive multiple of the q4_0 block size 32" in result.stderr
    result = mer("synth", "--layers", "2", "--out", tmp_path / "x")
    assert result.returncode == 1 and "missing --experts, --top-k, --d-model, --d-ff, --dtype" in result.stderr
    assert not (tmp_path / "x").exists()


def test_store_commands_on_a_missing_store(tmp_path):
    for action in ("info", "verify"):
        result = mer("store", action, tmp_path / "absent")
        assert result.returncode == 1 and "no such store directory" in result.stderr
