"""`mer-pipeline trace simulate`, run as a real subprocess on traces written with TraceWriter."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mer.routing.space import RoutingDecision
from mer.routing.trace import TraceHeader, TraceWriter

pytestmark = pytest.mark.slow  # starts the process graph

MER_PIPELINE = shutil.which("mer-pipeline", path=str(Path(sys.executable).parent)) or "mer-pipeline"
TINY_READ_NBYTES = 221_184
ROW_KEYS = {"predictor", "policy", "cache_slots", "hits", "misses", "hit_rate_pct", "stalls", "bytes_read",
            "bytes_per_token", "min_misses", "min_bytes_read", "reads", "pool_slots"}


def mer(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, *map(str, argv)], capture_output=True, text=True, timeout=120)


def write_trace(path: Path, header: TraceHeader, num_tokens: int, seed: int = 0) -> Path:
    """Clustered routing (as the markov workload): stay near the last experts with probability 0.9."""
    rng = random.Random(seed)
    cluster = 0
    with TraceWriter(path, header) as writer:
        for token in range(num_tokens):
            if rng.random() > 0.9:
                cluster = rng.randrange(4)
            for layer in range(header.layers):
                members = [e for e in range(header.experts_per_layer) if e % 4 == cluster]
                experts = rng.sample(members, header.top_k)
                writer.write(RoutingDecision(token, layer, tuple(experts), (0.5,) * header.top_k))
    return path


@pytest.fixture(scope="module")
def flat_trace(tmp_path_factory) -> Path:
    return write_trace(tmp_path_factory.mktemp("trace") / "flat.jsonl", TraceHeader(1, 16, 2), 300)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "tiny"
    assert mer("synth", "--preset", "tiny", "--out", out, "--quiet").returncode == 0
    return out


def test_json_rows_for_every_predictor_policy_and_size(flat_trace):
    result = mer("trace", "simulate", flat_trace, "--cache-slots", "8,4", "--policy", "lru,belady",
                 "--predictor", "none,markov", "--expert-bytes", 1_000_000, "--disk-mbps", 500,
                 "--compute-ms-per-token", 4, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    rows = document["results"]
    assert [(r["predictor"], r["policy"], r["cache_slots"]) for r in rows] == [
        (p, policy, c) for p in ("none", "markov") for policy in ("lru", "belady") for c in (4, 8)]
    for row in rows:
        assert ROW_KEYS | {"projected_s_per_token"} <= set(row)
        assert row["hits"] + row["misses"] == 600
        assert row["bytes_read"] == row["reads"] * 1_000_000 >= row["min_bytes_read"]
        assert row["projected_s_per_token"] >= 0.004
    by_key = {(r["predictor"], r["policy"], r["cache_slots"]): r for r in rows}
    for slots in (4, 8):
        assert by_key[("none", "belady", slots)]["misses"] <= by_key[("none", "lru", slots)]["misses"]
        assert by_key[("none", "belady", slots)]["misses"] == by_key[("none", "belady", slots)]["min_misses"]
        assert by_key[("markov", "lru", slots)]["pool_slots"] == slots + 2
    assert document["trace"] == {"path": str(flat_trace), "tokens": 300, "layers": 1, "experts_per_layer": 16,
                                 "top_k": 2, "lookups": 600}
    assert document["projection"]["disk_mbps"] == 500 and document["projection"]["compute_ms_per_token"] == 4
    assert document["predictors"][0]["predictor"] == "markov" and document["predictors"][0]["hints"] > 0


def test_default_policies_and_bytes_unknown(flat_trace):
    result = mer("trace", "simulate", flat_trace, "--cache-slots", "6", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [r["policy"] for r in document["results"]] == ["lru", "lfu", "lru+pin", "layer", "belady"]
    assert all(r["predictor"] == "none" for r in document["results"])
    assert all(r["bytes_read"] is None and "projected_s_per_token" not in r for r in document["results"])
    assert any("bytes unknown" in note for note in document["notes"])


def test_human_table_with_store_sizes_and_plot(flat_trace, tiny_store, tmp_path):
    plot = tmp_path / "hit-rate.png"
    result = mer("trace", "simulate", flat_trace, "--cache-slots", "4,8,16", "--store", tiny_store,
                 "--plot", plot)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{flat_trace}: 300 tokens, 1 layer(s) x 16 experts, top-2, 600 lookups")
    assert lines[1].split()[:4] == ["predictor", "policy", "slots", "hits"] and len(lines) == 2 + 15  # 5 policies x 3
    sixteen = [line.split() for line in lines[2:] if line.split()[2] == "16"]
    assert all(cells[3:5] == ["584", "16"] for cells in sixteen)  # everything fits: one miss per expert
    assert all(cells[-1] == f"{16 * TINY_READ_NBYTES // 300:,}" for cells in sixteen)
    assert "no projection" in result.stderr
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (700, 450)


def test_projection_from_a_run_log(flat_trace, tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text("\n".join(json.dumps({"schema": 1, "t_mono": 2.0, **event}) for event in [
        {"event": "expert_read", "expert_id": 3, "slot": 0, "nbytes": 2_000_000, "latency_us": 4_000.0,
         "kind": "foreground"},
        {"event": "run_summary", "compute_us_per_token": 5_000.0}]) + "\n")
    result = mer("trace", "simulate", flat_trace, "--cache-slots", "4", "--policy", "lru", "--expert-bytes",
                 1_000_000, "--from-log", log, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    [row] = document["results"]
    assert document["projection"]["disk_mbps"] == pytest.approx(500)
    assert row["projected_s_per_token"] == pytest.approx(0.005 + row["bytes_per_token"] / 500e6)


@pytest.mark.parametrize("arguments, message, status", [
    # a flag's own value is a usage error (2); a value that does not fit the trace, or a missing input, is 1
    (["--cache-slots", "16,x"], "--cache-slots '16,x': 'x' is not a positive integer", 2),
    (["--cache-slots", "0"], "'0' is not a positive integer", 2),
    (["--cache-slots", "1"], "--cache-slots 1 is below the trace's top_k 2", 1),
    (["--cache-slots", "4", "--policy", "lru,fifo"], "--policy: unknown cache policy 'fifo'; known: lru, lfu", 2),
    (["--cache-slots", "4", "--predictor", "oracle"], "--predictor: unknown predictor 'oracle'; known: none, markov", 2),
    (["--cache-slots", "4", "--disk-mbps", "100"], "the projection needs a compute time", 1),
])
def test_clear_errors(flat_trace, arguments, message, status):
    result = mer("trace", "simulate", flat_trace, *arguments, "--json")
    assert result.returncode == status and result.stdout == ""
    assert result.stderr.startswith("mer-pipeline trace: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line


def test_trace_store_mismatch_and_bad_traces(tmp_path, tiny_store):
    layered_wrong = write_trace(tmp_path / "wrong.jsonl", TraceHeader(2, 16, 2), 10)
    result = mer("trace", "simulate", layered_wrong, "--cache-slots", "4", "--store", tiny_store)
    assert result.returncode == 1
    assert "the trace's geometry (2 layer(s) x 16 experts) does not fit the store" in result.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"mer_trace":1,"layers":1,"experts_per_layer":16,"top_k":2}\n{"token":0,"layer":0}\n')
    result = mer("trace", "simulate", broken, "--cache-slots", "4")
    assert result.returncode == 1 and "broken.jsonl:2: missing field 'experts'" in result.stderr
    result = mer("trace", "simulate", tmp_path / "missing.jsonl", "--cache-slots", "4")
    assert result.returncode == 1 and "missing.jsonl: cannot read the trace" in result.stderr
    result = mer("trace", "simulate", broken, "--cache-slots", "4", "--compute-ms-per-token", "1",
                 "--from-log", broken)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
