"""`--cluster` end to end (issue #17): the console script, a throw-away local Ray cluster of 2-3 nodes on this
machine (Ray's own cluster utilities), one real shard group (`shard-serve`, its own graph) per node over
CURVE tcp, the tiny model shipped with mer.

Checked: `generate --cluster local:2` gives the single-machine `generate`'s greedy tokens and logits bit for
bit, with one `shard_link_summary` per shard (requests, rows, bytes, round trips, no failover);
`--cluster local:3 --replicas 2` with one shard group's whole process group killed (SIGKILL) mid-run still
generates every token, identical, after a `shard_failed_over`; without replicas the same kill fails the
command loudly (exit 1, nothing on stdout) with `ShardUnavailableError` naming the shard and its experts;
`run --cluster local:2` gives the single-machine benchmark's outputs bit for bit; `serve --cluster local:2`
answers a completion and serves `mer_shard_*` metrics per shard; bad cluster flags are errors naming the
flag. After each run the leak guard finds no process, /dev/shm segment or runtime
directory left (the killed group's run is removed as a later supervisor's stale-run clean-up would), and
no Ray directory is left in /tmp.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mer.cli.exit_status import EXIT_SIGTERM
from mer.model.hparams import read_hparams
from mer.models import tiny_model_path
from mer.store.gguf_source import read_gguf_source
from tests.support.generate_runs import run_cli_to_end, run_generate
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, read_json_lines, run_ids_in_log
from tests.support.process_groups import kill_process_group, remove_runs_of_log
from tests.support.serve_runs import ServerRun

pytest.importorskip("ray")  # in the `test` extra: the README's test command runs these

PROMPT_TOKENS = "1,72,101,108,108,111,32,119,111,114,108,100"
GRAPH = ("--compute-workers", 1, "--expert-slices", 2)
CLUSTER_TIMEOUT_S = 240.0  # a Ray cluster, 2-3 shard graphs and the router's graph on a loaded 2-core machine


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the module: the tiny model's store and its shard stores are made once."""
    return tmp_path_factory.mktemp("cluster-cache")


def tiny_d_model() -> int:
    return read_hparams(read_gguf_source(tiny_model_path()).parts[0]).d_model


def mer_ray_directories() -> set[str]:
    return {name for name in os.listdir("/tmp") if name.startswith("mer-ray-")}


def logits_bits(path: Path) -> np.ndarray:
    return np.load(path).view(np.uint32)


def events(log_path: Path, name: str) -> list[dict]:
    return [event for event in read_json_lines(log_path) if event.get("event") == name]


@pytest.mark.slow
def test_generate_on_two_shard_groups_equals_one_machine_bit_for_bit(leak_guard, tmp_path, cache_dir):
    ray_before = mer_ray_directories()
    flags = ("--prompt-tokens", PROMPT_TOKENS, "-n", 16, "--ignore-eos", *GRAPH)
    single = run_generate(leak_guard, tiny_model_path(), *flags, "--dump-logits", tmp_path / "single.npy",
                          workdir=tmp_path, cache_dir=cache_dir)
    cluster = run_generate(leak_guard, tiny_model_path(), *flags, "--dump-logits", tmp_path / "cluster.npy",
                           "--cluster", "local:2", workdir=tmp_path, cache_dir=cache_dir, timeout_s=CLUSTER_TIMEOUT_S)
    assert cluster.result["tokens"] == single.result["tokens"] and len(single.result["tokens"]) == 16
    assert np.array_equal(logits_bits(tmp_path / "cluster.npy"), logits_bits(tmp_path / "single.npy"))
    assert "2 shard groups (1 per expert) up" in cluster.stderr

    started = events(cluster.log_path, "cluster_shard_group_started")
    assert sorted(event["shard"] for event in started) == [0, 1]
    assert len({event["endpoint"] for event in started}) == 2
    assert all(event["endpoint"].startswith("tcp://") for event in started)
    summaries = sorted(events(cluster.log_path, "shard_link_summary"), key=lambda event: event["shard"])
    assert [event["shard"] for event in summaries] == [0, 1]
    for summary in summaries:
        assert summary["requests"] > 0 and summary["rows"] >= summary["requests"]
        assert summary["bytes_sent"] == summary["bytes_received"] == summary["rows"] * 4 * tiny_d_model()  # f32 rows
        assert 0 < summary["round_trip_us_min"] <= summary["round_trip_us_mean"] <= summary["round_trip_us_max"]
        assert summary["failovers"] == 0 and summary["errors"] == 0 and not summary["down"]
    assert events(cluster.log_path, "ray_cluster_stopped")
    assert mer_ray_directories() == ray_before  # the throw-away cluster's directory is gone


def start_generate(guard, tmp_path: Path, cache_dir: Path, *flags) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / "generate.jsonl"
    argv = [MER_PIPELINE, "generate", "--prompt-tokens", PROMPT_TOKENS, "--ignore-eos", "--log-file", str(log_path),
            "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), *map(str, GRAPH), *map(str, flags), "--json"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    guard.add_supervisor_pid(process.pid)
    return process, log_path


def kill_shard_group_mid_run(guard, process: subprocess.Popen, log_path: Path, shard: int, after_tokens: int) -> dict:
    """Once `after_tokens` tokens are generated, SIGKILL shard group `shard`'s whole process group; wait until
    none of it is left and remove its run as a later supervisor's stale-run clean-up would. Its start event."""
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    while len(events(log_path, "generation_token")) < after_tokens:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the generation did not get going"
        time.sleep(0.02)
    (group,) = [event for event in events(log_path, "cluster_shard_group_started") if event["shard"] == shard]
    process_group = os.getpgid(group["pid"])
    assert process_group != os.getpgid(process.pid)
    kill_process_group(process_group)
    remove_runs_of_log(guard, Path(group["work_dir"]) / "shard-serve.jsonl")
    return group


def finish(guard, process: subprocess.Popen, log_path: Path) -> tuple[str, str]:
    try:
        stdout, stderr = process.communicate(timeout=CLUSTER_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for run_id in run_ids_in_log(log_path):
            guard.add_run(run_id)
    return stdout, stderr


@pytest.mark.heavy
@pytest.mark.slow
def test_a_killed_shard_group_fails_over_to_its_replica_and_loses_no_token(leak_guard, tmp_path, cache_dir):
    reference = run_generate(leak_guard, tiny_model_path(), "--prompt-tokens", PROMPT_TOKENS, "-n", 40,
                             "--ignore-eos", *GRAPH, workdir=tmp_path, cache_dir=cache_dir).result["tokens"]
    process, log_path = start_generate(leak_guard, tmp_path, cache_dir, "-n", 40, "--cluster", "local:3",
                                       "--replicas", 2, "--shard-deadline-s", 3)
    killed = kill_shard_group_mid_run(leak_guard, process, log_path, shard=0, after_tokens=3)
    stdout, stderr = finish(leak_guard, process, log_path)
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["tokens"] == reference  # every token, identical
    failovers = events(log_path, "shard_failed_over")
    assert failovers and {event["shard"] for event in failovers} == {0}
    assert failovers[0]["endpoint"] == killed["endpoint"]
    summaries = {event["shard"]: event for event in events(log_path, "shard_link_summary")}
    assert summaries[0]["down"] and summaries[0]["failovers"] >= 1
    assert not summaries[1]["down"] and not summaries[2]["down"]


@pytest.mark.heavy
@pytest.mark.slow
def test_a_killed_shard_group_without_replica_fails_loudly_naming_the_shard(leak_guard, tmp_path, cache_dir):
    process, log_path = start_generate(leak_guard, tmp_path, cache_dir, "-n", 200, "--cluster", "local:2",
                                       "--shard-deadline-s", 2)
    kill_shard_group_mid_run(leak_guard, process, log_path, shard=1, after_tokens=3)
    stdout, stderr = finish(leak_guard, process, log_path)
    assert process.returncode == 1, stderr
    assert stdout == ""  # never a silently different answer
    assert "ShardUnavailableError" in stderr and "shard 1 (tcp://" in stderr, stderr
    assert "have no other live replica" in stderr and "(id " in stderr, stderr
    (unavailable, *_) = events(log_path, "shard_unavailable")
    assert unavailable["shard"] == 1 and unavailable["experts"]


@pytest.mark.heavy
@pytest.mark.slow
def test_run_on_two_shard_groups_gives_the_single_machine_outputs(leak_guard, tmp_path, cache_dir, pipeline_stores):
    outputs = {}
    for name, flags in (("single", ()), ("cluster", ("--cluster", "local:2"))):
        log_path = tmp_path / f"{name}.jsonl"
        argv = [MER_PIPELINE, "run", "--store", str(pipeline_stores["tiny"]), "--tokens", "12", "--layered",
                "--log-file", str(log_path), "--dump-outputs", str(tmp_path / f"{name}.npy"), "--json",
                "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S), *map(str, GRAPH), *flags]
        returncode, stdout, stderr = run_cli_to_end(leak_guard, argv, cache_dir=cache_dir, log_path=log_path,
                                                    timeout_s=CLUSTER_TIMEOUT_S)
        assert returncode == 0, stderr
        assert json.loads(stdout)["tokens"] == 12
        outputs[name] = np.load(tmp_path / f"{name}.npy")
    assert outputs["single"].shape[0] > 0
    assert np.array_equal(outputs["cluster"].view(np.uint32), outputs["single"].view(np.uint32))
    assert len(events(tmp_path / "cluster.jsonl", "shard_link_summary")) == 2


@pytest.mark.parametrize("flags, message", [
    (("--shards", "2"), "--shards shape a cluster: give --cluster ADDRESS too"),
    (("--cluster", "local:99"), "--cluster 'local:99'"),
    (("--cluster", "10.0.0.1:6379"), "give --cluster-keys DIR"),
    (("--cluster", "local:2", "--replicas", "3", "--shards", "2"), "--replicas 3: more than --shards 2"),
    (("--cluster", "local:2", "--store-dir", "/ssd/{node}"), "--store-dir '/ssd/{node}': unknown placeholder {node}"),
])
def test_bad_cluster_flags_are_errors_naming_the_flag(leak_guard, tmp_path, flags, message):
    argv = [MER_PIPELINE, "generate", "--prompt-tokens", "1,2", "-n", "1", *flags]
    returncode, stdout, stderr = run_cli_to_end(leak_guard, argv, cache_dir=tmp_path / "cache")
    assert returncode == 1 and stdout == ""
    assert message in stderr, stderr


@pytest.mark.heavy
@pytest.mark.slow
def test_serve_on_two_shard_groups_answers_and_exposes_shard_metrics(leak_guard, tmp_path, cache_dir):
    server = ServerRun.start(tmp_path, "--cluster", "local:2", *GRAPH, cache_dir=cache_dir)
    leak_guard.add_supervisor_pid(server.process.pid)
    try:
        status, body = server.post("/v1/completions", {"prompt": "hello world", "max_tokens": 6, "temperature": 0,
                                                        "ignore_eos": True})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 6
        samples = server.metrics()
        for shard in ("0", "1"):
            assert samples[f'mer_shard_requests_total{{shard={shard}}}'] > 0
            assert samples[f'mer_shard_bytes_sent_total{{shard={shard}}}'] > 0
            assert samples[f'mer_shard_round_trip_seconds_total{{shard={shard}}}'] > 0
            assert samples[f'mer_shard_failovers_total{{shard={shard}}}'] == 0
            assert samples[f'mer_shard_down{{shard={shard}}}'] == 0
        top = subprocess.run([MER_PIPELINE, "top", "--url", server.base_url, "--once", "--json", "--interval", "0.5"],
                             capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        shards = json.loads(top.stdout)["shards"]
        assert [row["shard"] for row in shards] == [0, 1] and not any(row["down"] for row in shards)
    finally:
        for run_id in server.run_ids():
            leak_guard.add_run(run_id)
        assert server.stop(signal.SIGTERM, timeout_s=120) == EXIT_SIGTERM, "".join(server.stderr_lines)
    assert len(server.events_named("shard_link_summary")) == 2
