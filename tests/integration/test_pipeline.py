"""The process graph end to end: `mer-pipeline run` with real processes, ipc sockets, the /dev/shm slot
arena and io_uring O_DIRECT reads of stores written to disk under the test's temporary directory.

Checked: the outputs (`--dump-outputs`) against the single-process reference and against plain
numpy on `gguf.quants` dequantized weights; bit-identical outputs whatever the worker count and
from run to run; the summary's invariants (lookups, bytes read, reads per expert, I/O share) and its
recomputation from the log; the read backends (uring on disk, preadv forced, the tmpfs fallback).
Stores: 2 MoE layers x 8 experts, d_model 256, d_ff 512 in q4_0 (the tiny preset), q4_k/q4_k/q6_k
and q8_0 (`tests/conftest.py`). The leak guard of conftest checks after every test that no
process, shared-memory file, runtime directory or socket is left.
"""

from __future__ import annotations

import math
import shutil
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from mer.config import PipelineConfig
from mer.router.bench_job import synthetic_hidden_state
from tests.support.bench_reference import reference_outputs
from mer.store.reader import ExpertStore
from mer.metrics.summary import summarize_log_events
from mer.routing.trace import read_trace
from tests.support.host import AUTO_BACKEND, URING_PROBLEM
from tests.support.quant_helpers import reference_q8_k
from tests.support.pipeline_runs import filesystem_type, read_json_lines, round_up_to_page, run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

TOKENS = 12
SEED = 3
CACHE_SLOTS = 4  # fewer than the 16 experts: evictions happen
# The graph must compute what the reference computes up to float32 rounding. Both run the same
# kernels on the same bytes and sum in the same order, so today they agree exactly (printed by the
# test; what is asserted bit for bit is the worker-count independence the slicing design guarantees).
REFERENCE_RTOL = 1e-5
REFERENCE_ATOL = 1e-6
# Plain numpy in float64 on dequantized weights, with the K-quant inputs (x, h) rounded to Q8_K as
# the kernels and llama.cpp round them, vs the graph's float32 kernels: float32 rounding of 256- and
# 512-term dot products, relative to the output scale.
NUMPY_RELATIVE_TOLERANCE = 1e-4


def reference_config(store: Path, *, workload: str, layered: bool) -> PipelineConfig:
    return PipelineConfig(store=store, tokens=TOKENS, cache_slots=CACHE_SLOTS, top_k=2, workload=workload,
                          layered=layered, seed=SEED, compute_workers=1)


def dump_run(leak_guard, store: Path, workdir: Path, *, workers: int, workload: str, layered: bool,
             extra: tuple = ()) -> tuple[np.ndarray, dict]:
    outputs = workdir / f"outputs-{uuid.uuid4().hex[:8]}.npy"
    flags = ["--tokens", TOKENS, "--cache-slots", CACHE_SLOTS, "--compute-workers", workers, "--seed", SEED,
             "--workload", workload, "--dump-outputs", outputs, *(["--layered"] if layered else []), *extra]
    run = run_pipeline(leak_guard, store, *flags, workdir=workdir).check_ok()
    return np.load(outputs), run.summary


OUTPUT_CASES = [
    pytest.param("tiny", False, "markov", id="q4_0-flat-markov"),
    pytest.param("tiny", False, "uniform", id="q4_0-flat-uniform"),
    pytest.param("tiny", True, "markov", id="q4_0-layered-markov"),
    pytest.param("tiny", True, "uniform", id="q4_0-layered-uniform"),
    pytest.param("mixed", False, "uniform", id="q4_k-q6_k-flat-uniform"),
    pytest.param("q8", True, "markov", id="q8_0-layered-markov"),
]


@pytest.mark.parametrize("store_name, layered, workload", OUTPUT_CASES)
def test_outputs_match_the_reference_for_one_and_two_workers(
    leak_guard, pipeline_stores, tmp_path, store_name, layered, workload
):
    store = pipeline_stores[store_name]
    one, summary_one = dump_run(leak_guard, store, tmp_path, workers=1, workload=workload, layered=layered)
    two, summary_two = dump_run(leak_guard, store, tmp_path, workers=2, workload=workload, layered=layered)
    reference = reference_outputs(reference_config(store, workload=workload, layered=layered), ExpertStore.open(store))

    decisions = TOKENS * (2 if layered else 1)
    assert reference.shape == one.shape == two.shape == (decisions, 1, 256)
    assert one.dtype == two.dtype == np.float32
    assert np.all(np.isfinite(one)) and np.abs(one).max() > 0
    np.testing.assert_allclose(one, reference, rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL)
    np.testing.assert_allclose(two, reference, rtol=REFERENCE_RTOL, atol=REFERENCE_ATOL)
    # d_ff slices are fixed by the format and summed in slice order: bit-identical for any N
    assert np.array_equal(one, two)
    assert (summary_one["compute_workers"], summary_two["compute_workers"]) == (1, 2)
    print(f"graph == reference exactly: {np.array_equal(one, reference)}; "
          f"max |graph - reference| = {np.abs(one - reference).max()}")


def test_outputs_are_identical_from_run_to_run(leak_guard, pipeline_stores, tmp_path):
    store = pipeline_stores["mixed"]
    first, _ = dump_run(leak_guard, store, tmp_path, workers=2, workload="markov", layered=True)
    second, _ = dump_run(leak_guard, store, tmp_path, workers=2, workload="markov", layered=True)
    assert np.array_equal(first, second)


def _dequantized(payload, matrix) -> np.ndarray:
    raw = payload.matrix_bytes(matrix).reshape(matrix.rows, -1)
    weights = dequantize(raw, GGMLQuantizationType[matrix.dtype.upper()])
    assert weights.shape == (matrix.rows, matrix.columns)
    return weights.astype(np.float64)


def test_outputs_match_plain_numpy_on_dequantized_weights(leak_guard, pipeline_stores, tmp_path):
    """An independent check of what the graph computes: the recorded routing, the synthetic hidden
    states and float64 SwiGLU on weights dequantized by `gguf.quants` (q4_k gate/up, q6_k down), their
    inputs rounded to Q8_K (`reference_q8_k`)."""
    store_dir = pipeline_stores["mixed"]
    trace_path = tmp_path / "trace.jsonl"
    outputs, _ = dump_run(leak_guard, store_dir, tmp_path, workers=2, workload="markov", layered=False,
                          extra=("--record-trace", trace_path))
    store = ExpertStore.open(store_dir)
    decisions = list(read_trace(trace_path)[1])
    assert len(decisions) == TOKENS == len(outputs)
    for index, decision in enumerate(decisions):
        x = synthetic_hidden_state(SEED, decision.token, decision.layer, 256)[0].astype(np.float64)
        expected = np.zeros(256)
        for expert_id, weight in zip(decision.experts, decision.weights):
            payload = store.read_payload(expert_id)
            gate, up, down = (_dequantized(payload, matrix) for matrix in payload.format.matrices)
            rounded_x = reference_q8_k(x[None, :])[0]
            gate_x = gate @ rounded_x
            hidden = gate_x / (1 + np.exp(-gate_x)) * (up @ rounded_x)
            expected += weight * (down @ reference_q8_k(hidden[None, :])[0])
        scale = np.abs(expected).max()
        assert scale > 0
        error = np.abs(outputs[index, 0].astype(np.float64) - expected).max()
        assert error <= NUMPY_RELATIVE_TOLERANCE * scale, (index, error, scale)


# ---- the summary ---------------------------------------------------------------------------------


def _check_summary_against_log(run, summary: dict) -> None:
    """The printed summary is recomputed exactly from the log; io_share from the token_done events."""
    events = read_json_lines(run.log_path)
    assert summarize_log_events(events).to_json_dict() == summary
    tokens = [event for event in events if event["event"] == "token_done"]
    assert len(tokens) == summary["tokens"]
    io_wait = math.fsum(event["io_wait_us"] for event in tokens)
    cycle = math.fsum(event["cycle_us"] for event in tokens)
    assert summary["io_share_pct"] == pytest.approx(100 * io_wait / cycle, rel=1e-12)
    assert 0 <= summary["io_share_pct"] <= 100
    assert sum(event["hits"] for event in tokens) == summary["hits"]
    assert sum(event["misses"] for event in tokens) == summary["misses"]


def _routed_experts(trace_path: Path) -> list[int]:
    """Global expert ids of every lookup in a recorded trace (a flat trace is one layer of global ids)."""
    header, decisions = read_trace(trace_path)
    return [decision.layer * header.experts_per_layer + expert for decision in decisions for expert in decision.experts]


@pytest.mark.parametrize("layered", [False, True], ids=["flat", "layered"])
def test_summary_invariants_when_every_expert_fits(leak_guard, pipeline_stores, tmp_path, layered):
    """cache slots >= experts, no prefetch: every routed expert is read once, every other lookup hits."""
    store_dir = pipeline_stores["mixed"]
    assert filesystem_type(store_dir) != "tmpfs"  # io_uring with O_DIRECT needs a real filesystem
    trace_path = tmp_path / "trace.jsonl"
    tokens = 20
    run = run_pipeline(leak_guard, store_dir, "--tokens", tokens, "--cache-slots", 16, "--compute-workers", 2,
                       "--workload", "uniform", "--no-prefetch", "--record-trace", trace_path,
                       *(["--layered"] if layered else []), workdir=tmp_path).check_ok()
    summary = run.summary
    manifest = ExpertStore.open(store_dir).manifest
    layers = 2 if layered else 1

    assert summary["hits"] + summary["misses"] == tokens * 2 * layers == summary["lookups"]
    routed = _routed_experts(trace_path)
    assert len(routed) == tokens * 2 * layers
    reads = run.events_named("expert_read")
    read_counts = Counter(event["expert_id"] for event in reads)
    assert all(count == 1 for count in read_counts.values()), read_counts
    assert set(read_counts) == set(routed)
    assert summary["reads"] == len(reads) == len(set(routed)) == summary["misses"]
    assert summary["hits"] == len(routed) - len(set(routed))

    # bytes read = reads x the slot read size: the payload rounded up to whole pages
    payload = manifest.layers[0].format.payload_nbytes
    assert payload == 2 * 512 * 256 // 256 * 144 + 256 * 512 // 256 * 210 == 254_976
    assert round_up_to_page(payload) == 63 * 4096 == manifest.layers[0].format.read_nbytes
    assert all(event["nbytes"] == round_up_to_page(payload) for event in reads)
    assert summary["bytes_read"] == summary["reads"] * round_up_to_page(payload)
    assert summary["bytes_per_expert"] == payload

    assert summary["io_backend"] == AUTO_BACKEND
    assert (summary["cache_slots"], summary["pool_slots"], summary["top_k"]) == (16, 16, 2)
    assert summary["prefetches_issued"] == summary["prefetches_completed"] == 0
    assert summary["predictor_observations"] == tokens * layers
    _check_summary_against_log(run, summary)


def test_summary_invariants_with_prefetch_and_evictions(leak_guard, pipeline_stores, tmp_path):
    """Markov workload with prefetch on and fewer slots than experts (tiny store, q4_0)."""
    tokens = 40
    run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", tokens, "--cache-slots", 6,
                       "--compute-workers", 1, "--workload", "markov", "--seed", SEED, workdir=tmp_path).check_ok()
    summary = run.summary
    assert summary["hits"] + summary["misses"] == tokens * 2
    # a prefetch may finish after the router took its final statistics: the summary counts the reads
    # numbered below `reads_counted` (prefetch_stats), and the log may hold a few later ones
    counted = run.events_named("prefetch_stats")[-1]["reads_counted"]
    reads = [event for event in run.events_named("expert_read") if event["read_index"] < counted]
    assert summary["reads"] == len(reads) == counted
    assert summary["bytes_read"] == summary["reads"] * round_up_to_page(221_184) == summary["reads"] * 54 * 4096
    foreground = sum(event["kind"] == "foreground" for event in reads)
    prefetched = sum(event["kind"] == "prefetch" for event in reads)
    assert prefetched == summary["prefetches_completed"] <= summary["prefetches_issued"]
    # every miss either started a foreground read or joined a prefetch still in flight
    assert foreground <= summary["misses"] <= foreground + summary["prefetches_used"]
    assert summary["pool_slots"] == 6 + 2  # the cache plus one slot per prefetch hint (fanout 2)
    assert summary["io_backend"] == AUTO_BACKEND and summary["dtype"] == "q4_0"
    _check_summary_against_log(run, summary)


def test_the_hits_of_a_request_are_computed_while_its_misses_load(leak_guard, pipeline_stores, tmp_path):
    """An Acquire with hits and misses is answered in parts: the hits' grants at once (the router sends
    their compute jobs), then each miss once read; all hits: one part (tiny store, 1 worker)."""
    run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 60, "--cache-slots", 4, "--no-prefetch",
                       "--compute-workers", 1, "--workload", "markov", "--seed", SEED, workdir=tmp_path).check_ok()
    acquires = {event["token"]: event for event in run.events_named("acquire_done")}
    decisions = {event["token"]: event for event in run.events_named("decision_done")}
    jobs = {event["job_id"]: event for event in run.events_named("compute_job")}
    read = {(event["token"], event["expert_id"]) for event in run.events_named("expert_read")}
    assert len(acquires) == len(decisions) == 60
    split = [token for token, event in acquires.items() if event["hits"] and event["misses"]]
    assert len(split) >= 5, "the workload gives requests with both hits and misses"
    for token, acquire in acquires.items():
        if token not in split:
            assert acquire["t_hits_sent"] is None
            continue
        assert acquire["t_received"] <= acquire["t_hits_sent"] < acquire["t_answered"]
        # a job per part and layer: the hits' jobs hold only hits and were sent before any of the misses',
        # and each miss is a part of its own
        sent = [jobs[job_id] for job_id, worker in decisions[token]["jobs"]]
        kinds = [{(token, expert) in read for expert in job["expert_ids"]} for job in sent]
        assert all(len(kind) == 1 for kind in kinds)
        missed = [kind == {True} for kind in kinds]
        assert missed == sorted(missed) and not missed[0] and missed[-1]
        assert sum(len(job["expert_ids"]) for job, miss in zip(sent, missed) if not miss) == acquire["hits"]
        assert all(len(job["expert_ids"]) == 1 for job, miss in zip(sent, missed) if miss)


# ---- record and replay ---------------------------------------------------------------------------


def test_replay_of_a_recorded_trace_reproduces_the_run(leak_guard, pipeline_stores, tmp_path):
    store = pipeline_stores["q8"]
    common = ("--tokens", 16, "--cache-slots", 5, "--no-prefetch", "--compute-workers", 2, "--seed", 11)
    trace = tmp_path / "trace.jsonl"
    recorded = run_pipeline(leak_guard, store, *common, "--workload", "markov", "--layered",
                            "--record-trace", trace, "--dump-outputs", tmp_path / "recorded.npy",
                            workdir=tmp_path).check_ok()
    replayed = run_pipeline(leak_guard, store, *common, "--workload", "replay", "--trace", trace, "--layered",
                            "--dump-outputs", tmp_path / "replayed.npy", workdir=tmp_path).check_ok()
    for key in ("hits", "misses", "reads", "bytes_read", "tokens"):
        assert replayed.summary[key] == recorded.summary[key], key
    assert np.array_equal(np.load(tmp_path / "replayed.npy"), np.load(tmp_path / "recorded.npy"))
    # the reads in the order they were submitted (concurrent reads may complete in either order)
    read_order = [[event["expert_id"] for event in sorted(run.events_named("expert_read"), key=lambda e: e["t_submit"])]
                  for run in (recorded, replayed)]
    assert read_order[0] == read_order[1]


# ---- read backends -------------------------------------------------------------------------------


@pytest.fixture
def tmpfs_store(pipeline_stores) -> Path:
    """A copy of the tiny store in /dev/shm (tmpfs: no useful O_DIRECT)."""
    directory = Path("/dev/shm") / f"test-store-{uuid.uuid4().hex[:8]}"
    shutil.copytree(pipeline_stores["tiny"], directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _backend_selected(run) -> dict:
    (selected,) = run.events_named("io_backend_selected")
    return selected


def test_preadv_forced_on_disk(leak_guard, pipeline_stores, tmp_path):
    run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 6, "--cache-slots", 4,
                       "--compute-workers", 1, "--io-backend", "preadv", workdir=tmp_path).check_ok()
    assert run.summary["io_backend"] == "preadv"
    assert run.summary["hits"] + run.summary["misses"] == 12
    selected = _backend_selected(run)
    assert selected["backend"] == "preadv" and selected["o_direct"] is True
    assert "forced" in selected["reason"]


def test_the_arena_is_prefaulted_in_the_background_after_the_io_worker_is_ready(leak_guard, pipeline_stores, tmp_path):
    run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 6, "--cache-slots", 4,
                       "--compute-workers", 1, workdir=tmp_path).check_ok()
    (prefaulted,) = run.events_named("arena_prefaulted")
    assert prefaulted["process"].startswith("mer-io-")  # logged with the I/O worker's bound fields
    assert prefaulted["background"] is True and prefaulted["method"] == "madvise"
    slot_nbytes = -(-run.summary["bytes_per_expert"] // 4096) * 4096  # slots are page-aligned
    assert prefaulted["nbytes"] == run.summary["pool_slots"] * slot_nbytes
    io_ready = [event for event in run.events_named("child_ready") if event.get("process", "").startswith("mer-io-")]
    assert io_ready and io_ready[0]["t_mono"] <= prefaulted["t_mono"]  # READY did not wait for it


def test_tmpfs_store_falls_back_to_preadv(leak_guard, tmpfs_store, tmp_path):
    run = run_pipeline(leak_guard, tmpfs_store, "--tokens", 6, "--cache-slots", 4, "--compute-workers", 1,
                       workdir=tmp_path).check_ok()
    assert run.summary["io_backend"] == "preadv"
    selected = _backend_selected(run)
    assert selected["backend"] == "preadv" and selected["o_direct"] is False
    assert "fell back" in selected["reason"] and "tmpfs" in selected["reason"]


def test_uring_forced_on_tmpfs_fails_clearly(leak_guard, tmpfs_store, tmp_path):
    run = run_pipeline(leak_guard, tmpfs_store, "--tokens", 6, "--cache-slots", 4, "--compute-workers", 1,
                       "--io-backend", "uring", workdir=tmp_path)
    assert run.returncode == 1
    assert run.stdout == ""  # --json: nothing on stdout on error
    assert "mer-io-" in run.stderr and "IoBackendUnavailableError" in run.stderr
    assert "io_backend 'uring'" in run.stderr
    assert (URING_PROBLEM in run.stderr) if URING_PROBLEM else ("tmpfs" in run.stderr)
    assert "Traceback" not in run.stderr  # mer's own errors are explained, not dumped
    assert run.seconds < 60
