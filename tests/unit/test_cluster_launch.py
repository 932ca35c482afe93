"""The `--cluster` pieces without a cluster: the flags' checks (`mer.cli.cluster_flags`), the shard map a
command chooses and the graph flags its shard groups get (`mer.cli.cluster_launch`), and `RemoteDispatcher`
(mer/router/remote_dispatcher.py) over the fake shard links of test_remote_shards_choice: global ids are
split by layer, each layer goes to its shards, the outputs come back under the caller's ids and the
per-shard counters (`shard_link_summary`) count what went. The real thing: tests/e2e/test_cluster_cli.py."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from mer.cli.cluster_flags import add_cluster_flags, cluster_options
from mer.cli.cluster_launch import choose_shard_map, graph_flags
from mer.cluster.shard_balance import uniform_map
from mer.cluster.shard_map import write_shard_map
from mer.config import load_config
from mer.errors import ConfigError, ShardMapError
from mer.router.remote_dispatcher import RemoteDispatcher
from mer.router.remote_shards import RemoteShards
from tests.unit.test_remote_shards_choice import D_MODEL, FakeLink, rows

GEOMETRY = SimpleNamespace(num_moe_layers=2, experts_per_layer=4)


def options(*argv: str):
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    return cluster_options(parser.parse_args(list(argv)))


def test_without_cluster_there_are_no_options_and_cluster_flags_alone_are_errors():
    assert options() is None
    with pytest.raises(ConfigError, match="--replicas, --store-dir shape a cluster: give --cluster ADDRESS too"):
        options("--replicas", "2", "--store-dir", "/ssd")


def test_defaults_and_checked_values(tmp_path):
    local = options("--cluster", "local:3")
    assert (local.shards, local.replicas, local.deadline_s, local.wire_precision, local.keys) == (None, None, 10.0,
                                                                                                   "f32", None)
    given = options("--cluster", "local:2", "--store-dir", "/ssd/m-{shard}of{shards}", "--shard-deadline-s", "2.5",
                    "--wire-precision", "f16")
    assert given.store_path(1, 2) == "/ssd/m-1of2" and given.deadline_s == 2.5 and given.wire_precision == "f16"
    with pytest.raises(ConfigError, match="give --cluster-keys DIR"):
        options("--cluster", "auto")
    with pytest.raises(ConfigError, match=f"--cluster-keys {tmp_path / 'none'}: not a directory"):
        options("--cluster", "auto", "--cluster-keys", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="--shard-map .*: no such file"):
        options("--cluster", "local:2", "--shard-map", str(tmp_path / "map.json"))
    with pytest.raises(ConfigError, match=r"--store-dir '/ssd/\{': "):
        options("--cluster", "local:2", "--store-dir", "/ssd/{")


def test_the_shard_map_is_the_uniform_one_per_node_or_the_given_one_checked(tmp_path):
    shard_map = choose_shard_map(options("--cluster", "local:3", "--replicas", "2"), GEOMETRY, 3)
    assert shard_map == uniform_map(2, 4, 3, 2)
    assert choose_shard_map(options("--cluster", "local:3", "--shards", "2"), GEOMETRY, 3).num_shards == 2
    with pytest.raises(ConfigError, match="--shards 3: more shard groups than the 2 nodes"):
        choose_shard_map(options("--cluster", "local:2", "--shards", "3"), GEOMETRY, 2)
    with pytest.raises(ConfigError, match="--replicas 2: more than the 1 shards"):
        choose_shard_map(options("--cluster", "local:1", "--replicas", "2"), GEOMETRY, 1)
    path = tmp_path / "map.json"
    write_shard_map(path, uniform_map(2, 4, 2, 2))
    assert choose_shard_map(options("--cluster", "local:2", "--shard-map", str(path)), GEOMETRY, 2).replicas == 2
    with pytest.raises(ConfigError, match="--replicas 1: the shard map .* has 2 replicas"):
        choose_shard_map(options("--cluster", "local:2", "--shard-map", str(path), "--replicas", "1"), GEOMETRY, 2)
    with pytest.raises(ShardMapError, match="field 'experts_per_layer' is 4, but the model has 8"):
        choose_shard_map(options("--cluster", "local:2", "--shard-map", str(path)),
                         SimpleNamespace(num_moe_layers=2, experts_per_layer=8), 2)


def test_shard_groups_get_the_commands_graph_settings():
    config = load_config(None, {"compute_workers": 3, "expert_slices": 2, "kernel_threads": 1}, available_cores=8)
    flags = graph_flags(config)
    assert flags[flags.index("--compute-workers") + 1] == "3" and flags[flags.index("--expert-slices") + 1] == "2"
    assert "--handshake-timeout-s" in flags and "--io-backend" in flags


class FakeManifest:
    geometry = GEOMETRY

    def expert_id(self, moe_layer: int, expert: int) -> int:
        return moe_layer * GEOMETRY.experts_per_layer + expert

    def expert(self, expert_id: int):
        return SimpleNamespace(moe_layer=expert_id // GEOMETRY.experts_per_layer)


def test_the_remote_dispatcher_splits_global_ids_by_layer_and_counts_each_shard():
    async def scenario():
        links = [FakeLink(0), FakeLink(1)]
        shards = RemoteShards(uniform_map(2, 4, 2), links, deadline_s=5.0)
        events = []
        log = SimpleNamespace(info=lambda name, **fields: events.append((name, fields)))
        dispatcher = RemoteDispatcher(FakeManifest(), shards, log)
        batches = {5: rows(1.0), 0: rows(2.0, 3.0), 6: rows(4.0)}  # global ids: layer 1 experts 1, 2; layer 0 expert 0
        outputs, stats = await dispatcher.run_experts(7, batches)
        assert list(outputs) == [5, 0, 6]  # the caller's order
        # uniform map: expert e on shard e % 2, which answers row * (shard + 2)
        assert np.array_equal(outputs[5], rows(3.0)) and np.array_equal(outputs[0], rows(4.0, 6.0))
        assert np.array_equal(outputs[6], rows(8.0))
        assert stats.chunks == 2 and stats.compute_us > 0
        assert [request.moe_layer for request in links[0].sent] == [0, 1] and links[1].sent[0].experts == [1]
        await dispatcher.close()
        summaries = {fields["shard"]: fields for name, fields in events if name == "shard_link_summary"}
        assert summaries[0]["requests"] == 2 and summaries[0]["rows"] == 3 and summaries[1]["rows"] == 1
        assert summaries[0]["bytes_sent"] == summaries[0]["bytes_received"] == 3 * D_MODEL * 4
        assert all(link.closed for link in links)

    asyncio.run(scenario())
