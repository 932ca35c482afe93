"""The parts of tools/bench_beyond_ram.py: the streamed Mixtral-shaped GGUF writer, the routing-spread
check, the ABBA pairing, the per-process read counters, the memory cgroup and the disk-room refusal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import beyond_ram_report as report  # noqa: E402
from beyond_ram_setup import check_room, mixtral_geometry  # noqa: E402
from memory_cgroup import CgroupUnavailable, cgroup_name, make_memory_cgroup  # noqa: E402
from moe_gguf_writer import (FIRST_PLAIN_TOKEN, GEOMETRIES, MoEGeometry, plain_token_ids, q4_0_nbytes,  # noqa: E402
                             tensor_plans, write_moe_gguf)
from page_cache import evict_files  # noqa: E402
from process_io import IoSampler, process_tree  # noqa: E402

from mer.quant.dequant import dequantize
from mer.store.gguf_source import read_gguf_source


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values.astype(np.float64)))))


def test_the_streamed_gguf_has_mixtrals_layout_with_valid_blocks_at_the_planned_scales(tmp_path):
    geometry = GEOMETRIES["tiny"]
    path = write_moe_gguf(tmp_path / "tiny.gguf", geometry, seed=3)
    reader = GGUFReader(path)
    plans = tensor_plans(geometry)
    assert [tensor.name for tensor in reader.tensors] == [plan.name for plan in plans]
    for tensor, plan in zip(reader.tensors, plans):
        assert tensor.tensor_type == plan.qtype
        assert list(tensor.shape) == list(reversed(plan.shape))  # GGML order: fastest first
        assert tensor.n_bytes == plan.nbytes
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    assert by_name["blk.0.ffn_gate_exps.weight"].tensor_type == GGMLQuantizationType.Q4_0
    assert by_name["blk.0.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32
    assert reader.fields["llama.expert_count"].parts[-1][0] == geometry.n_experts
    assert reader.fields["llama.expert_used_count"].parts[-1][0] == geometry.top_k

    def values(name: str) -> np.ndarray:
        tensor = by_name[name]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return dequantize(np.asarray(tensor.data).reshape(-1).view(np.uint8), "q4_0", shape)

    embedding = values("token_embd.weight")
    assert np.isfinite(embedding).all() and abs(_rms(embedding) - 1.0) < 0.05
    assert abs(float(embedding.mean())) < 0.05  # the random sign of d cancels the quants' -0.5 mean
    down = values("blk.1.ffn_down_exps.weight")
    assert abs(_rms(down) * math.sqrt(geometry.d_ff) - 1.0) < 0.05
    damped = values("blk.0.attn_output.weight")
    assert abs(_rms(damped) * math.sqrt(geometry.d_model) - 0.2) < 0.01
    # mer reads it as a merged-expert MoE model of the same geometry
    source = read_gguf_source(path)
    assert source.geometry.num_experts == geometry.n_layers * geometry.n_experts
    # same seed, same bytes; another seed, other bytes
    again = write_moe_gguf(tmp_path / "again.gguf", geometry, seed=3)
    other = write_moe_gguf(tmp_path / "other.gguf", geometry, seed=4)
    assert again.read_bytes() == path.read_bytes() != other.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_mixtral_geometry_matches_the_issue():
    mixtral = GEOMETRIES["mixtral-8x7b"]
    assert mixtral.expert_nbytes == 99_090_432  # the synthetic store's expert size
    total = sum(plan.nbytes for plan in tensor_plans(mixtral))
    assert 25.0e9 < total < 26.5e9  # ~26.3 GB written
    assert max(plan.nbytes for plan in tensor_plans(mixtral)) == 8 * q4_0_nbytes(14336, 4096)  # one tensor in RAM
    ids = plain_token_ids(mixtral, 32, seed=0)
    assert len(ids) == 32 and min(ids) >= FIRST_PLAIN_TOKEN and max(ids) < mixtral.vocab_size


def test_the_in_ram_variant_is_mixtrals_shape_with_fewer_blocks():
    eight = mixtral_geometry(8)
    mixtral = GEOMETRIES["mixtral-8x7b"]
    assert eight.name == "mixtral-8x7b-8l" and eight.n_layers == 8
    assert eight.expert_nbytes == mixtral.expert_nbytes and eight.top_k == mixtral.top_k
    assert eight.expert_bytes_total == mixtral.expert_bytes_total // 4  # 8 of 32 blocks: ~6.3 GB of experts
    assert mixtral_geometry(None) is mixtral and mixtral_geometry(32) is mixtral
    with pytest.raises(SystemExit, match="--layers 0"):
        mixtral_geometry(0)


def test_a_disk_without_room_is_refused_with_the_numbers(tmp_path):
    huge = MoEGeometry("huge", n_layers=1, n_experts=8, top_k=2, d_model=4096, d_ff=2**27, n_heads=32,
                       n_kv_heads=8, vocab_size=32000, context_length=4096)
    with pytest.raises(SystemExit, match=r"GB free; the GGUF and its converted store need"):
        check_room(tmp_path / "m.gguf", tmp_path / "m-gguf", huge, write_gguf=True, convert=True)
    check_room(tmp_path / "m.gguf", tmp_path / "m-gguf", GEOMETRIES["tiny"], write_gguf=True, convert=True)


def _write_log(path: Path, prompt_length: int, decisions: list[tuple[int, list[int]]]) -> None:
    lines = [{"event": "acquire_done", "token": prompt_length - 1, "expert_ids": list(range(16))}]  # prefill
    lines += [{"event": "acquire_done", "token": token, "expert_ids": ids} for token, ids in decisions]
    lines.append({"event": "generation_token", "index": 0, "t_mono": 1.0})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_routing_usage_counts_decode_passes_per_layer_and_flags_concentration(tmp_path):
    rng = np.random.default_rng(0)
    spread = [(8 + step, [layer * 8 + int(e) for e in rng.choice(8, 2, replace=False)])
              for step in range(30) for layer in range(2)]
    _write_log(tmp_path / "spread.jsonl", 8, spread)
    usage = report.routing_usage(tmp_path / "spread.jsonl", 8, 8)
    assert sorted(usage) == [0, 1] and all(sum(counts) == 60 for counts in usage.values())  # prefill not counted
    assert report.concentration_problems(usage) == []
    stuck = [(8 + step, [layer * 8 + 3, layer * 8 + 5]) for step in range(30) for layer in range(2)]
    _write_log(tmp_path / "stuck.jsonl", 8, stuck)
    problems = report.concentration_problems(report.routing_usage(tmp_path / "stuck.jsonl", 8, 8))
    assert len(problems) == 3 and problems[0].startswith("layer 0: usage [0, 0, 0, 30, 0, 30, 0, 0]")
    assert report.concentration_problems({}) != []
    assert report.normalized_entropy([5] * 8) == pytest.approx(1.0)


def _fewest_misses(steps, slots, from_token, resident=frozenset()):
    """Exhaustive search over every eviction choice: the true optimum (tiny inputs only)."""
    if not steps:
        return 0
    (token, ids), rest = steps[0], steps[1:]
    missing = sorted(set(ids) - resident)
    cost = len(missing) if token >= from_token else 0
    outcomes = [frozenset(resident)]
    for expert in missing:
        grown = []
        for state in outcomes:
            if len(state) < slots:
                grown.append(state | {expert})
            else:
                grown.extend((state - {victim}) | {expert} for victim in state - set(ids))
        outcomes = grown
    return cost + min(_fewest_misses(rest, slots, from_token, state) for state in set(outcomes))


def test_block_figures_split_decode_and_prefill_blocks_of_the_log(tmp_path):
    log = tmp_path / "mer.jsonl"
    def block(tokens, dense_us, expert_us, hits, misses):
        return json.dumps({"event": "moe_block_done", "tokens": tokens, "dense_us": dense_us, "expert_us": expert_us,
                           "hits": hits, "misses": misses})
    log.write_text("\n".join([
        block(32, 9000.0, 50000.0, 1, 7),  # prefill: 1 hit of 8
        block(32, 9100.0, 52000.0, 3, 5),  # prefill: 3 of 8
        json.dumps({"event": "acquire_done", "token": 32, "expert_ids": [1, 2]}),
        block(1, 4000.0, 15000.0, 2, 0),
        block(1, 5000.0, 70000.0, 1, 1),
        block(1, 6000.0, 16000.0, 0, 2),
        '{"event": "generation_token", "note": "moe_block_done is in its text, not its name"}',
    ]) + "\n")
    figures = report.block_figures(log)
    assert figures["dense_ms_per_block"] == 5.0 and figures["expert_ms_per_block"] == 16.0  # decode medians
    assert figures["decode_hit_rate_pct"] == pytest.approx(100 * 3 / 6)
    assert figures["prefill_hit_rate_pct"] == pytest.approx(100 * 4 / 16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert report.block_figures(empty) == {"dense_ms_per_block": None, "expert_ms_per_block": None,
                                           "decode_hit_rate_pct": None, "prefill_hit_rate_pct": None}


def test_belady_misses_are_the_optimum_and_count_only_the_decode_steps(tmp_path):
    # the textbook case: 3 slots, 1 2 3 4 1 2 5 1 2 3 4 5 -> 7 misses with MIN (LRU: 10)
    sequence = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    steps = [(position, (expert,)) for position, expert in enumerate(sequence)]
    assert report.belady_misses(steps, 3, 0) == 7
    assert report.belady_misses(steps, 3, 4) == 3  # the first four steps warm the cache uncounted
    rng = np.random.default_rng(1)
    for trial in range(30):  # two experts a step (top-2), small caches: equal to the exhaustive optimum
        slots = int(rng.integers(2, 5))
        steps = [(position, tuple(int(e) for e in rng.choice(6, 2, replace=False))) for position in range(7)]
        assert report.belady_misses(steps, slots, 2) == _fewest_misses(steps, slots, 2), (trial, slots, steps)
    _write_log(tmp_path / "log.jsonl", 0, [(token, list(ids)) for token, ids in steps])
    prefill = (-1, tuple(range(16)))  # the log's prompt step, then the decisions in order
    assert report.acquire_steps(tmp_path / "log.jsonl") == [prefill, *steps]
    with pytest.raises(ValueError, match="1 slots cannot hold"):
        report.belady_misses([(0, (1, 2))], 1, 0)


def test_abba_rounds_pair_each_half_with_llama_cpp():
    assert report.abba_order(["L", "M", "N"]) == ["L", "M", "N", "N", "M", "L"]
    runs = [
        {"engine": "L", "round": 0, "half": 0, "ok": True, "decode_tps": 1.0},
        {"engine": "M", "round": 0, "half": 0, "ok": True, "decode_tps": 2.0},
        {"engine": "M", "round": 0, "half": 1, "ok": True, "decode_tps": 3.0},
        {"engine": "L", "round": 0, "half": 1, "ok": True, "decode_tps": 1.5},
        {"engine": "L", "round": 1, "half": 0, "ok": True, "decode_tps": 1.0},
        {"engine": "M", "round": 1, "half": 0, "ok": False},
        {"engine": "M", "round": 1, "half": 1, "ok": True, "decode_tps": 1.0},
        {"engine": "L", "round": 1, "half": 1, "ok": True, "decode_tps": 2.0},
    ]
    assert report.pair_ratios(runs, "L", "M", "decode_tps") == [(0, 2.0), (0, 2.0), (1, 0.5)]
    rows = report.summarize(runs, ["L", "M"], "L")
    assert rows[1]["runs"] == 3 and rows[1]["failed"] == 1
    assert rows[1]["decode_tps_ratio"]["per_round"] == [pytest.approx(2.0), pytest.approx(0.5)]
    assert rows[1]["decode_tps_ratio"]["spread"] == (0.5, 2.0) and rows[1]["decode_tps_ratio"]["median"] == 2.0
    assert "| M | 3 (+1 failed) | 1.000-3.000 | 2.00x (0.50-2.00; rounds 2.00x, 0.50x) |" in report.format_table("x", rows)


def test_read_bytes_of_a_process_tree_count_reads_from_disk_once_and_not_page_cache_hits(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(32 << 20))
    evict_files([data])
    script = tmp_path / "reader.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "time.sleep(0.2)\n"
        "subprocess.run([sys.executable, '-c', 'import sys, time; open(sys.argv[1], \"rb\").read(); time.sleep(0.3)',"
        " sys.argv[1]])\n"  # a child reads the file from disk, is sampled, exits and is reaped
        "time.sleep(0.3)\n"
        "open(sys.argv[1], 'rb').read()\n"  # the parent reads it again: page cache hits
        "time.sleep(0.2)\n")
    process = subprocess.Popen([sys.executable, str(script), str(data)])
    with IoSampler(lambda: process_tree(process.pid), interval_s=0.02) as sampler:
        process.wait()
    assert len(sampler.parents) == 2
    assert (32 << 20) <= sampler.total() < (32 << 20) + (4 << 20)  # counted once: by the child, then the parent
    start, end = sampler.samples[0][0], sampler.samples[-1][0]
    assert sampler.bytes_between(start, end) == pytest.approx(sampler.total() - sampler.samples[0][1])
    assert sampler.at(start - 10) == sampler.samples[0][1] and sampler.at(end + 10) == sampler.total()
    assert sampler.peak_resident > 0


def test_a_launched_command_runs_inside_its_memory_cgroup_under_the_limit():
    try:
        group = make_memory_cgroup(cgroup_name("unit"), 256 << 20)
    except CgroupUnavailable as error:
        pytest.skip(f"no memory cgroup here: {error}")
    try:
        assert 255 << 20 <= group.limit() <= 256 << 20
        result = subprocess.run([*group.launcher_prefix(), sys.executable, "-c",
                                 "import os; print(open('/proc/self/cgroup').read()); "
                                 "x = bytearray(64 << 20); print(len(x))"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert group.path.name in result.stdout
        assert (64 << 20) <= group.peak_nbytes() <= 256 << 20
        assert group.oom_kills() == 0
    finally:
        deadline = time.monotonic() + 10
        while group.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        group.remove()
    assert not group.path.exists()
