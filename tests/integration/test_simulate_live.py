"""A live run recorded with --no-prefetch, replayed by `trace simulate --policy P`, gives exactly its hits and misses
(P = lru, and the layer-cycle policy `layer`, which the live I/O worker runs with --cache-policy layer).

The live run goes through the real process graph (router, I/O worker with io_uring reads into
shared memory, compute workers) on a tiny synthetic store; the replay runs offline through the same
slot table, LRU policy and step acquisition order. Both flat-pool and --layered runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mer.simulate.simulator import load_trace, simulate

pytestmark = pytest.mark.slow  # starts the process graph

MER_PIPELINE = shutil.which("mer-pipeline", path=str(Path(sys.executable).parent)) or "mer-pipeline"
TOKENS = 200


def mer(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, *map(str, argv)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("live") / "tiny"
    result = mer("synth", "--preset", "tiny", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def leftovers(run_id: str) -> list[str]:
    """Shared-memory segments and processes still named with the run id."""
    found = [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if run_id in name]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if run_id in command:
            found.append(f"process {pid}: {command}")
    return found


@pytest.mark.parametrize("layered, cache_slots, policy", [(False, 5, "lru"), (True, 6, "lru"), (True, 5, "layer"),
                                                          (False, 5, "layer")],
                         ids=["flat", "layered", "layered-layer-policy", "flat-layer-policy"])
def test_replay_gives_exactly_the_live_hits_and_misses(tmp_path, tiny_store, layered, cache_slots, policy):
    trace_path, log_path = tmp_path / "T.jsonl", tmp_path / "L.jsonl"
    live = mer("run", "--store", tiny_store, "--tokens", TOKENS, "--cache-slots", cache_slots, "--no-prefetch",
               "--compute-workers", 1, "--handshake-timeout-s", 120, "--record-trace", trace_path,
               "--log-file", log_path, "--json", "--cache-policy", policy, *(["--layered"] if layered else []))
    assert live.returncode == 0, live.stderr
    summary = json.loads(live.stdout)
    events = log_events(log_path)
    run_ids = {event["run_id"] for event in events if "run_id" in event}
    assert len(run_ids) == 1 and leftovers(run_ids.pop()) == []
    lookups_per_token = (2 if layered else 1) * 2
    assert summary["pool_slots"] == cache_slots and summary["lookups"] == TOKENS * lookups_per_token
    assert 20 < summary["misses"] < summary["lookups"] - 20, "the cache must both hit and evict for a real check"

    simulated_policy = policy if layered else "lru"  # on the flat pool the layer policy is LRU (one layer)
    replay = mer("trace", "simulate", trace_path, "--cache-slots", cache_slots, "--policy", simulated_policy,
                 "--store", tiny_store, "--json")
    assert replay.returncode == 0, replay.stderr
    [row] = json.loads(replay.stdout)["results"]
    assert (row["predictor"], row["policy"], row["cache_slots"]) == ("none", simulated_policy, cache_slots)
    assert (row["hits"], row["misses"]) == (summary["hits"], summary["misses"])
    assert (row["reads"], row["bytes_read"]) == (summary["reads"], summary["bytes_read"])
    assert row["hit_rate_pct"] == pytest.approx(summary["hit_rate_pct"])

    tokens = {event["token"]: event for event in events if event.get("event") == "token_done"}
    assert sorted(tokens) == list(range(TOKENS))
    result = simulate(load_trace(trace_path), cache_slots, simulated_policy)
    if simulated_policy != "lru":  # the live run really ran the other policy: LRU would have missed differently
        assert simulate(load_trace(trace_path), cache_slots, "lru").misses != summary["misses"]
    assert result.token_hits == {token: tokens[token]["hits"] for token in tokens}
    assert result.token_misses == {token: tokens[token]["misses"] for token in tokens}
    live_reads = sorted(event["expert_id"] for event in events if event.get("event") == "expert_read")
    assert sorted(result.demand_reads.elements()) == live_reads
