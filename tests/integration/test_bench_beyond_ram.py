"""tools/bench_beyond_ram.py --quick end to end: a small Mixtral-shaped GGUF written and converted,
llama.cpp and `mer-pipeline generate` in ABBA order, each in its own memory cgroup with the same
memory for the model's data (smaller than the model, so both stream), and mer reading no more bytes
per decode token than llama.cpp (~2 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # writes a model and runs both engines twice

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


@pytest.mark.heavy
def test_quick_benchmark_streams_both_engines_and_mer_reads_no_more_per_token(tmp_path, leak_guard):
    pytest.importorskip("llama_cpp")
    workdir = tmp_path / "bench"
    command = [sys.executable, str(REPO / "tools" / "bench_beyond_ram.py"), "--quick", "--json",
               "--workdir", str(workdir)]
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)
    if not output["cgroups"]:
        pytest.skip(f"no memory cgroup here, the bytes comparison is not fair: {output['skipped']}")
    allowance = output["quick_allowance"]
    assert allowance["mer_budget"] < allowance["mer_fixed_bytes"] + allowance["expert_bytes_total"]  # must stream
    assert [run["engine"] for run in output["runs"]] == ["llama.cpp", "mer defaults", "mer defaults", "llama.cpp"]
    for run in output["runs"]:
        assert run["ok"], run
        assert run["decode_steps"] == output["max_tokens"] - 1 and run["decode_tps"] > 0 and run["prefill_tps"] > 0
        assert run["oom_kills"] == 0
        assert run["decode_gb_per_token"] > 0  # the model's data does not fit: every engine reads while decoding
        assert 0 < run["peak_gib"] * GIB <= run["limit_bytes"]
    mer_runs = [run for run in output["runs"] if run["engine"] != "llama.cpp"]
    llama_runs = [run for run in output["runs"] if run["engine"] == "llama.cpp"]
    for run in mer_runs:
        assert run["ram_budget"] == allowance["mer_budget"] == run["limit_bytes"]
        assert run["cache_slots"] == allowance["cache_slots"]
        assert run["settings"]["cache_slots"] == allowance["cache_slots"]
        assert run["routing_problems"] == [] and run["routing"]["layers"] == output["geometry"]["n_layers"]
        # mer's own count of its decode reads agrees with what its processes read (their read_bytes)
        assert run["mer_mib_read_per_token"] * 2**20 <= run["decode_gb_per_token"] * 1e9 * 1.1
        assert 0.95 <= run["counted_vs_mer_bytes"] <= 1.05, run
        assert run["dense_ms_per_block"] > 0 and run["expert_ms_per_block"] > 0
        assert 0 <= run["decode_hit_rate_pct"] <= 100 and 0 <= run["prefill_hit_rate_pct"] <= 100
    for run in llama_runs:  # llama.cpp's limit: its own memory + mer's dense weights and arena
        assert run["limit_bytes"] > allowance["llama_data_allowance"]
    # the goal: mer reads no more bytes per decode token than llama.cpp with the same data memory
    check = output["quick_bytes_check"]
    assert check["fair"] is True
    assert check["mer_max_gb_per_token"] <= check["llama_min_gb_per_token"]
    row = output["summary"][next(iter(output["summary"]))][1]
    assert row["engine"] == "mer defaults" and len(row["decode_tps_ratio"]["per_round"]) == 1
    assert list(Path("/sys/fs/cgroup/memory").glob(output["cgroup_prefix"] + "*")) == []  # every cgroup removed
