"""The console script on cases the fuzzing of tests/unit/test_malformed_{gguf,manifest}_fuzz.py found: a
GGUF whose metadata array claims 2^40 one-byte elements (`convert`, `store`'s siblings read it the
same way) and a manifest whose offset is a string (`store info`, `store verify`).

Each ends at once with exit 1 and one `error:` line naming the file, under an address-space limit
of 4 GiB (before the fix the GGUF one looped for 20 s allocating gigabytes, the manifest one was an
`internal error`).
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
from pathlib import Path

from gguf import GGUFReader, GGUFValueType

from mer.store.convert import convert_gguf
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import MER_PIPELINE

ADDRESS_SPACE_LIMIT = 4 * 2**30
TIMEOUT_S = 60


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def mer(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, *map(str, arguments)], capture_output=True, text=True, timeout=TIMEOUT_S,
                          preexec_fn=limited)


def one_error_line(result: subprocess.CompletedProcess, command: str, path: Path) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mer-pipeline {command}: error: {path}"), result.stderr
    return lines[0]


def test_a_gguf_with_a_huge_array_count_is_refused_by_convert(tmp_path):
    path = write_tiny_moe_gguf(tmp_path / "model.gguf", vocab_size=300, seed=1).path
    reader = GGUFReader(path)
    field = next(field for field in reader.fields.values() if field.types[:1] == [GGUFValueType.ARRAY])
    data = bytearray(path.read_bytes())
    base = reader.data.ctypes.data
    struct.pack_into("<I", data, field.parts[3].ctypes.data - base, int(GGUFValueType.UINT8))
    struct.pack_into("<Q", data, field.parts[4].ctypes.data - base, 2**40)
    path.write_bytes(data)
    line = one_error_line(mer("convert", path, "--out", tmp_path / "store", "--quiet"), "convert", path)
    assert f"the element count of metadata key {field.name!r} is 1099511627776" in line
    assert not (tmp_path / "store").exists()


def test_a_manifest_with_a_string_offset_is_refused_by_store_info_and_verify(tmp_path):
    model = write_tiny_moe_gguf(tmp_path / "model.gguf", vocab_size=300, seed=1).path
    store = tmp_path / "store"
    convert_gguf(model, store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["experts"][2][3] = str(manifest["experts"][2][3])
    (store / "manifest.json").write_text(json.dumps(manifest))
    for action in ("info", "verify"):
        line = one_error_line(mer("store", action, store), "store", store / "manifest.json")
        assert "malformed manifest: experts[2][3] (offset) is '" in line
