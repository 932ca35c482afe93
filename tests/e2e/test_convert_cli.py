"""`mer-pipeline convert` as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mer.store.gguf_identity import gguf_identity
from mer.store.reader import ExpertStore
from tests.support.gguf_models import write_tiny_moe_gguf

MER_PIPELINE = Path(sys.executable).parent / "mer-pipeline"


def mer_pipeline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(MER_PIPELINE), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_json_result_is_the_only_stdout(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch="qwen3moe", n_layers=3)
    done = mer_pipeline("convert", info.path, "--out", tmp_path / "store", "--json", "--quiet",
                        "--log-file", tmp_path / "convert.jsonl")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"out", "experts", "bytes", "seconds", "source_hash"}
    manifest = ExpertStore.open(tmp_path / "store").manifest
    assert result["out"] == str(tmp_path / "store") and result["experts"] == 12 == manifest.geometry.num_experts
    assert result["bytes"] == manifest.total_payload_nbytes() and result["seconds"] >= 0
    assert result["source_hash"] == gguf_identity(info.path) == manifest.source.hash
    assert '"event": "convert_done"' in (tmp_path / "convert.jsonl").read_text()  # the events go to the log file
    assert '"event"' not in done.stderr  # and stderr holds no info events (warnings only)


def test_plain_result_line_and_force(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "s.gguf", split=2)
    out = tmp_path / "store"
    done = mer_pipeline("convert", info.path, "--out", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("converted 8 experts") and done.stdout.count("\n") == 1
    again = mer_pipeline("convert", info.path, "--out", out)
    assert again.returncode == 1 and again.stdout == ""
    assert f"mer-pipeline convert: error: {out}: output already exists (use --force to replace it)" in again.stderr
    forced = mer_pipeline("convert", info.path, "--out", out, "--force", "--layout", "planar")
    assert forced.returncode == 0, forced.stderr
    assert ExpertStore.open(out).manifest.layout == "planar"


def test_errors_name_the_culprit_and_leave_nothing(tmp_path):
    text = tmp_path / "readme.gguf"
    text.write_text("hello")
    odd = write_tiny_moe_gguf(tmp_path / "odd.gguf", dtypes=("q4_0", "q4_0", "q5_0"))
    split = write_tiny_moe_gguf(tmp_path / "parts.gguf", split=3)
    split.paths[1].unlink()
    cases = {
        text: "readme.gguf: not a GGUF file",
        odd.path: "unsupported tensor type Q5_0 in " + str(odd.path) + ": tensor blk.0.ffn_down_exps.weight",
        split.paths[0]: "is missing " + str(split.paths[1]),
    }
    for path, message in cases.items():
        done = mer_pipeline("convert", path, "--out", tmp_path / "store")
        assert done.returncode == 1 and done.stdout == "" and message in done.stderr, done.stderr
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
    assert mer_pipeline("convert", odd.path).returncode == 2  # --out is required
