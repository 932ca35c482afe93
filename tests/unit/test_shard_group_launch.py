"""Starting a node's shard group: the `shard-serve` command line it runs, and waiting for its
`shard_group_listening` with real child processes: the endpoint it logged, or an error naming the node, its
ip, the events it logged and its stderr when it exits or stays silent past the timeout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mer.cli.shard_serve_command import parse_expert_ids
from mer.cluster.shard_group_launch import (LOG_NAME, STDERR_NAME, ShardGroupSpec, ShardGroupStartError,
                                            format_expert_ids, shard_serve_argv, wait_for_listening)
from mer.errors import ConfigError


@pytest.mark.parametrize("ids, text", [((0, 1, 2, 3, 8, 9, 10, 11), "0-3,8-11"), ((5,), "5"),
                                       ((12, 0, 2, 3), "0,2-3,12")])
def test_expert_ids_are_written_as_shard_serve_reads_them(ids, text):
    assert format_expert_ids(ids) == text
    assert parse_expert_ids(text) == sorted(ids)


@pytest.mark.parametrize("ids", [(), (1, 1), (-1, 2)])
def test_bad_expert_ids_are_refused(ids):
    with pytest.raises(ConfigError, match="not distinct ids >= 0"):
        format_expert_ids(ids)


def test_the_group_binds_port_zero_on_the_node_ip(tmp_path):
    spec = ShardGroupSpec("/data/store", "/keys", 1, (4, 5, 6), ("--compute-workers", "2"))
    argv = shard_serve_argv(spec, "10.0.0.7", tmp_path / LOG_NAME)
    assert argv[0].endswith("mer-pipeline") and argv[1] == "shard-serve"
    assert "--json" in argv  # the summary on stdout, one JSON object
    pairs = [word for word in argv[2:] if word != "--json"]
    flags = dict(zip(pairs[0::2], pairs[1::2], strict=True))
    assert flags["--bind"] == "tcp://10.0.0.7:0" and flags["--store"] == "/data/store"
    assert flags["--keys"] == "/keys" and flags["--shard"] == "1" and flags["--experts"] == "4-6"
    assert flags["--compute-workers"] == "2" and flags["--log-file"] == str(tmp_path / LOG_NAME)
    assert "--experts" not in shard_serve_argv(ShardGroupSpec("/s", "/k", 0), "10.0.0.7", tmp_path / LOG_NAME)


def child(tmp_path, code: str) -> subprocess.Popen:
    stderr = open(tmp_path / STDERR_NAME, "wb")
    with stderr:
        return subprocess.Popen([sys.executable, "-c", code], stderr=stderr, cwd=tmp_path)


def test_the_endpoint_is_read_from_the_log(tmp_path):
    lines = [{"event": "router_started"}, {"event": "shard_group_listening", "endpoint": "tcp://10.0.0.7:4012"}]
    code = (f"import time; time.sleep(0.3); open({LOG_NAME!r}, 'w').write({json.dumps(lines)!r}"
            ".replace('}, {', '}\\n{')[1:-1] + '\\n'); time.sleep(30)")
    process = child(tmp_path, code)
    try:
        assert wait_for_listening(process, tmp_path, 1, "10.0.0.7", 30.0) == "tcp://10.0.0.7:4012"
    finally:
        process.kill()
        process.wait()


def test_a_group_that_exits_is_an_error_naming_the_node_its_events_and_stderr(tmp_path):
    code = (f"import sys; open({LOG_NAME!r}, 'w').write('{{\"event\": \"store_open_failed\", \"error\": \"bad\"}}\\n');"
            " sys.stderr.write('no store here'); sys.exit(2)")
    process = child(tmp_path, code)
    with pytest.raises(ShardGroupStartError) as raised:
        wait_for_listening(process, tmp_path, 1, "10.0.0.7", 30.0)
    message = str(raised.value)
    assert f"shard node 1 (10.0.0.7): the shard group (pid {process.pid}) exited with status 2" in message
    assert "store_open_failed (bad)" in message and "no store here" in message


def test_a_silent_group_times_out_naming_the_node(tmp_path):
    process = child(tmp_path, "import time; time.sleep(30)")
    try:
        silent = (r"shard node 0 \(127.0.0.1\): .* did not log shard_group_listening within 1 s; "
                  r"its last events: \['none'\]")
        with pytest.raises(ShardGroupStartError, match=silent):
            wait_for_listening(process, tmp_path, 0, "127.0.0.1", 1.0)
    finally:
        process.kill()
        process.wait()
