"""The expert -> shard map: greedy balance by trace frequency (worked examples and the greedy bound on a
skewed trace), replicas on distinct shards, the shortest-queue replica, and the JSON file's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mer.cluster.shard_balance import balanced_map, expert_frequencies, imbalance, map_from_trace, uniform_map
from mer.cluster.shard_map import ShardMap, read_shard_map, write_shard_map
from mer.errors import ShardMapError, TraceError
from mer.routing.space import RoutingDecision
from mer.routing.trace import TraceHeader, TraceWriter

SEED = 20261206


def test_greedy_places_the_largest_first_on_the_least_loaded_shard():
    # order 0 (10), 2 (7), 3 (4), 1 (1): 0 -> shard 0; 2 -> 1; 3 -> 1 (7 < 10); 1 -> 0 (10 < 11)
    shard_map = balanced_map([10, 1, 7, 4], layers=1, experts_per_layer=4, num_shards=2)
    assert shard_map.placements == ((0,), (0,), (1,), (1,))
    assert shard_map.shard_loads([10, 1, 7, 4]) == [11.0, 11.0]
    assert shard_map.experts_of(0) == [0, 1] and shard_map.experts_of(1) == [2, 3]
    round_robin = uniform_map(1, 4, 2)
    assert round_robin.shard_loads([10, 1, 7, 4]) == [17.0, 5.0]
    assert imbalance(shard_map.shard_loads([10, 1, 7, 4])) == 1.0
    assert imbalance(round_robin.shard_loads([10, 1, 7, 4])) == pytest.approx(17 / 11)


def test_replicas_go_to_distinct_least_loaded_shards_with_their_share():
    # 0 (6) -> shards 0, 1 (+3 each); 1 (3) -> shard 2 (0), then 0 (3, 3, 1 expert) before 1 by id (+1.5 each);
    # 2 (3) -> shard 2 (1.5), then 1 (3) (+1.5 each): loads [4.5, 4.5, 3]
    shard_map = balanced_map([6, 3, 3], layers=1, experts_per_layer=3, num_shards=3, replicas=2)
    assert shard_map.placements == ((0, 1), (2, 0), (2, 1))
    assert shard_map.shard_loads([6, 3, 3]) == [4.5, 4.5, 3.0]
    assert all(len(set(shards)) == 2 for shards in shard_map.placements)


def test_unseen_experts_are_spread_by_count():
    shard_map = balanced_map([0] * 6, layers=1, experts_per_layer=6, num_shards=3)
    assert [shard_map.experts_of(shard) for shard in range(3)] == [[0, 3], [1, 4], [2, 5]]


def test_the_uniform_map_is_round_robin_with_replicas():
    shard_map = uniform_map(layers=2, experts_per_layer=3, num_shards=3, replicas=2)
    assert shard_map.placements == ((0, 1), (1, 2), (2, 0), (0, 1), (1, 2), (2, 0))
    assert [len(shard_map.experts_of(shard)) for shard in range(3)] == [4, 4, 4]


def test_choose_replica_prefers_the_shortest_queue_ties_to_the_lowest_shard():
    shard_map = ShardMap(4, 3, 1, 2, ((3, 1, 2), (0, 2, 3)))
    assert shard_map.choose_replica(0, [0, 5, 2, 2]) == 2  # 2 and 3 tie at 2: the lower id
    assert shard_map.choose_replica(0, [0, 1, 2, 2]) == 1
    assert shard_map.choose_replica(1, [0, 0, 0, 0]) == 0
    assert shard_map.choose_replica(1, [9, 0, 4, 3]) == 3
    with pytest.raises(ShardMapError, match="queue_lengths has 3 entries, the map has 4 shards"):
        shard_map.choose_replica(0, [0, 0, 0])
    with pytest.raises(ShardMapError, match=r"expert 2 is not in the shard map's 0\.\.1"):
        shard_map.choose_replica(2, [0, 0, 0, 0])


def write_skewed_trace(path, layers: int, experts: int, top_k: int, tokens: int, zipf_s: float) -> np.ndarray:
    """A trace whose experts follow Zipf(s) per layer (a different popular set per layer); returns the
    counts computed here from the draws (global ids), independently of `expert_frequencies`."""
    rng = np.random.default_rng(SEED)
    probabilities = 1.0 / np.arange(1, experts + 1) ** zipf_s
    probabilities /= probabilities.sum()
    orders = [rng.permutation(experts) for _ in range(layers)]
    counts = np.zeros(layers * experts, dtype=np.int64)
    with TraceWriter(path, TraceHeader(layers, experts, top_k)) as writer:
        for token in range(tokens):
            for layer in range(layers):
                chosen = orders[layer][rng.choice(experts, size=top_k, replace=False, p=probabilities)]
                writer.write(RoutingDecision(token, layer, tuple(int(e) for e in chosen), (0.5,) * top_k))
                counts[layer * experts + chosen] += 1
    return counts


def layer_loads(shard_map: ShardMap, counts: np.ndarray, layer: int) -> list[float]:
    per_layer = np.zeros_like(counts, dtype=np.float64)
    first = layer * shard_map.experts_per_layer
    per_layer[first:first + shard_map.experts_per_layer] = counts[first:first + shard_map.experts_per_layer]
    return shard_map.shard_loads(per_layer)


@pytest.mark.parametrize("num_shards, replicas", [(2, 1), (3, 1), (4, 1), (3, 2)])
def test_on_a_skewed_trace_the_balanced_map_beats_round_robin(tmp_path, num_shards, replicas):
    print(f"seed {SEED}")
    layers, experts = 4, 16
    counts = write_skewed_trace(tmp_path / "skewed.jsonl", layers, experts, top_k=2, tokens=400, zipf_s=1.2)
    header, measured = expert_frequencies(tmp_path / "skewed.jsonl")
    assert (header.layers, header.experts_per_layer) == (layers, experts)
    np.testing.assert_array_equal(measured, counts)
    assert measured.sum() == 400 * layers * 2

    balanced = map_from_trace(tmp_path / "skewed.jsonl", num_shards, replicas)
    round_robin = uniform_map(layers, experts, num_shards, replicas)
    balanced_layers = [imbalance(layer_loads(balanced, counts, layer)) for layer in range(layers)]
    round_robin_layers = [imbalance(layer_loads(round_robin, counts, layer)) for layer in range(layers)]
    print(f"shards {num_shards} replicas {replicas}: per-layer max/mean balanced {np.round(balanced_layers, 3)} "
          f"round robin {np.round(round_robin_layers, 3)}; total balanced {imbalance(balanced.shard_loads(counts)):.3f} "
          f"round robin {imbalance(round_robin.shard_loads(counts)):.3f}")
    assert max(balanced_layers) < max(round_robin_layers)
    assert np.mean(balanced_layers) < np.mean(round_robin_layers)
    assert imbalance(balanced.shard_loads(counts)) <= imbalance(round_robin.shard_loads(counts))
    for layer in range(layers):  # the greedy (LPT) bound: max load <= mean + the largest share placed
        loads = layer_loads(balanced, counts, layer)
        largest_share = counts[layer * experts:(layer + 1) * experts].max() / replicas
        assert max(loads) <= sum(loads) / num_shards + largest_share + 1e-9
    for expert, shards in enumerate(balanced.placements):
        assert len(set(shards)) == replicas
        assert all(expert in balanced.experts_of(shard) for shard in shards)
    assert sorted(sum((balanced.experts_of(shard) for shard in range(num_shards)), [])) == sorted(
        list(range(layers * experts)) * replicas)


def test_the_map_is_deterministic(tmp_path):
    write_skewed_trace(tmp_path / "t.jsonl", 2, 8, 2, 50, 1.0)
    assert map_from_trace(tmp_path / "t.jsonl", 3, 2) == map_from_trace(tmp_path / "t.jsonl", 3, 2)


def test_a_malformed_trace_is_a_trace_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"mer_trace": 1, "layers": 1, "experts_per_layer": 4, "top_k": 1}\n'
                                        '{"token": 0, "layer": 0, "experts": [9], "weights": [1]}\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:2: expert id 9 is out of range"):
        map_from_trace(tmp_path / "bad.jsonl", 2)


def test_json_round_trip(tmp_path):
    shard_map = balanced_map([5, 1, 4, 2, 0, 3], layers=2, experts_per_layer=3, num_shards=3, replicas=2)
    write_shard_map(tmp_path / "map.json", shard_map)
    assert read_shard_map(tmp_path / "map.json") == shard_map
    assert json.loads((tmp_path / "map.json").read_text())["placements"] == [list(s) for s in shard_map.placements]


def good_json() -> dict:
    return uniform_map(layers=1, experts_per_layer=3, num_shards=3, replicas=2).to_json_dict()


@pytest.mark.parametrize("change, message", [
    ({"mer_shard_map": 2}, r"field 'mer_shard_map' is 2, this mer reads version 1"),
    ({"num_shards": 0}, r"field 'num_shards' must be a positive integer, got 0"),
    ({"replicas": True}, r"field 'replicas' must be a positive integer, got True"),
    ({"layers": "1"}, r"field 'layers' must be a positive integer, got '1'"),
    ({"replicas": 4, "placements": [[0, 1, 2, 0]] * 3}, r"field 'replicas' is 4, more than the 3 shards"),
    ({"placements": [[0, 1], [1, 2]]}, r"field 'placements' has 2 entries, the model has 3 experts .*every expert"),
    ({"placements": [[0, 1], [1], [2, 0]]}, r"field placements\[1\] has 1 shards, expected replicas = 2"),
    ({"placements": [[0, 1], [1, 3], [2, 0]]}, r"field placements\[1\]: shard 3 is not in 0\.\.2"),
    ({"placements": [[0, 1], [1, 1], [2, 0]]}, r"field placements\[1\]: replicas \[1, 1\] are not on distinct"),
    ({"placements": [[0, 1], [1, "2"], [2, 0]]}, r"field placements\[1\]: shard '2' is not in"),
    ({"placements": {"0": [0, 1]}}, r"field 'placements' must be a list of lists"),
])
def test_a_bad_map_file_names_the_file_and_field(tmp_path, change, message):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({**good_json(), **change}))
    with pytest.raises(ShardMapError, match=message) as raised:
        read_shard_map(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_missing_fields_and_bad_files_are_named(tmp_path):
    path = tmp_path / "map.json"
    data = good_json()
    del data["replicas"], data["layers"]
    path.write_text(json.dumps(data))
    with pytest.raises(ShardMapError, match=rf"{path}: missing field\(s\) replicas, layers"):
        read_shard_map(path)
    path.write_text("{not json")
    with pytest.raises(ShardMapError, match=rf"{path}: the shard map is not JSON"):
        read_shard_map(path)
    with pytest.raises(ShardMapError, match=rf"{tmp_path / 'absent.json'}: cannot read the shard map"):
        read_shard_map(tmp_path / "absent.json")


@pytest.mark.parametrize("call, message", [
    (lambda: balanced_map([1, 2], 1, 3, 2), "2 expert frequencies, the model has 3 experts"),
    (lambda: balanced_map([1, -2, 3], 1, 3, 2), "expert frequency -2.0 of expert 1 is not a finite number"),
    (lambda: balanced_map([1, float("nan"), 3], 1, 3, 2), "expert frequency nan of expert 1"),
    (lambda: uniform_map(1, 3, 2, replicas=3), "replicas 3 is more than the 2 shards"),
])
def test_bad_inputs_to_the_builders_are_refused(call, message):
    with pytest.raises(ShardMapError, match=message):
        call()
