"""The shard group's start message, its `--experts` flag and its summary: bad values are errors naming them."""

from __future__ import annotations

import pytest

from mer.cli.main import main
from mer.cli.shard_serve_command import parse_expert_ids
from mer.errors import ConfigError
from mer.metrics.summary import ShardSummary
from mer.protocol import StartShardGroup, decode, encode


def test_expert_ids_take_single_ids_and_ranges():
    assert parse_expert_ids("8-11,0-3,12") == [0, 1, 2, 3, 8, 9, 10, 11, 12]
    assert parse_expert_ids("5") == [5]


@pytest.mark.parametrize("text, pattern", [
    ("1,x", "'x' is not an id"), ("4-2", "'4-2' is not an id >= 0 or a range"), ("-1", "'-1'"),
    ("0-3,2", "name an expert twice"),
])
def test_bad_expert_ids_are_named(text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_expert_ids(text)


@pytest.mark.parametrize("fields, pattern", [
    (dict(bind="ipc:///tmp/x"), "binds tcp://HOST:PORT"),
    (dict(bind="tcp://host"), "binds tcp://HOST:PORT"),
    (dict(shard=-1), "shard must be an integer >= 0"),
    (dict(experts=[]), "experts is empty"),
    (dict(experts=[1, -2]), r"experts must be expert ids .* \[-2\]"),
    (dict(experts=[3, 3]), "lists an expert twice"),
])
def test_start_shard_group_checks_its_fields(fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        StartShardGroup(**{"bind": "tcp://127.0.0.1:0", "key_dir": "/keys", **fields})


def test_start_shard_group_round_trips():
    start = StartShardGroup("tcp://127.0.0.1:0", "/keys", 2, [4, 5])
    assert decode(encode(start)) == start


def test_shard_summary_round_trips_through_json():
    summary = ShardSummary(1, "tcp://127.0.0.1:4000", 8, 3, 15, 6, 1, 4, 2, 812.5, 2.25, 2)
    data = summary.to_json_dict()
    assert data["kind"] == "shard" and ShardSummary.from_json_dict(data) == summary
    with pytest.raises(Exception, match=r"missing fields \['rows'\]"):
        ShardSummary.from_json_dict({key: value for key, value in data.items() if key != "rows"})


def test_shard_serve_refuses_a_missing_key_directory_before_starting(tmp_path, capsys):
    store = tmp_path / "no-store"
    status = main(["shard-serve", "--store", str(store), "--bind", "tcp://127.0.0.1:0", "--keys",
                   str(tmp_path / "nokeys")])
    assert status != 0
    assert f"{tmp_path / 'nokeys' / 'shard.public'}: no such public key file" in capsys.readouterr().err


def test_a_shard_store_serves_its_own_experts_by_default_and_refuses_others_by_name(tmp_path, pipeline_stores):
    from mer.router.shard_job import served_experts
    from mer.store.reader import ExpertStore
    from mer.store.shard_copy import copy_shard

    copy_shard(pipeline_stores["tiny"], tmp_path / "shard1", (1, 2))
    manifest = ExpertStore.open(tmp_path / "shard1").manifest
    held = manifest.shard.experts
    assert max(held) >= len(manifest.experts)  # global ids beyond the count of experts it holds
    start = StartShardGroup("tcp://127.0.0.1:0", "/keys", 1)
    assert served_experts(start, manifest, "s1") == frozenset(held)
    assert served_experts(StartShardGroup("tcp://127.0.0.1:0", "/keys", 1, [max(held)]), manifest, "s1") == {max(held)}
    other = next(expert for expert in range(manifest.geometry.num_experts) if expert not in held)
    with pytest.raises(ConfigError, match=rf"shard 1: experts \[{other}\] are not in the store s1 \(it holds only "
                                          rf"the {len(held)} experts of shard 1/2"):
        served_experts(StartShardGroup("tcp://127.0.0.1:0", "/keys", 1, [other]), manifest, "s1")
