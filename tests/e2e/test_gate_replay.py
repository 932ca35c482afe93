"""The gate predictor replayed: `generate --record-trace --record-hidden` records the embedded model's
routing with each decision's residual; `run --workload replay --layered --predictors gate --gate-model`
replays it on a synthetic store of the model's routing geometry (6 MoE layers x 8 experts, other
expert sizes), sending the recorded residuals to the predictor, which applies the model's gates.

Checked: the trace carries d_model-sized residuals; the replayed gate issues prefetches that the
foreground uses and reports per-layer accuracy; against `--no-prefetch` with the same arena it cuts
demand misses; and the wrong uses fail with errors that say what to do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mer.models import tiny_model_path
from mer.routing.trace import read_trace
from tests.support.embedded_model import embedded_geometry
from tests.support.generate_runs import run_generate
from tests.support.pipeline_runs import run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

MER = [sys.executable, "-m", "mer.cli.main"]
TOKENS = 32
FANOUT = 4


@pytest.fixture(scope="module")
def replay_setup(tmp_path_factory):
    """(trace with residuals, trace without, store of the model's routing geometry)."""
    root = tmp_path_factory.mktemp("gate-replay")
    store = root / "store"
    synth = subprocess.run([*MER, "synth", "--layers", str(embedded_geometry().moe_layers), "--experts", "8", "--top-k", "2", "--d-model", "256",
                            "--d-ff", "512", "--dtype", "q4_0", "--out", str(store), "--quiet"],
                           capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr
    return root, store


def record(leak_guard, root: Path, name: str, *flags) -> Path:
    trace = root / name
    run = run_generate(leak_guard, tiny_model_path(), "--prompt", "def ", "-n", TOKENS, "--temperature", "0.7",
                       "--seed", 3, "--compute-workers", 1, "--record-trace", trace, *flags, workdir=root,
                       cache_dir=root / "cache")
    assert run.returncode == 0, run.stderr
    return trace


def test_replayed_gate_prefetches_what_the_model_routes(leak_guard, replay_setup, tmp_path):
    root, store = replay_setup
    trace = record(leak_guard, root, "hidden.jsonl", "--record-hidden")
    header, decisions = read_trace(trace)
    decisions = list(decisions)
    layers, experts, d_model = embedded_geometry()  # 6, 8, 192
    cache_slots = layers * experts // 4  # a quarter of the experts
    assert (header.layers, header.experts_per_layer, header.top_k) == (layers, experts, 2)
    assert all(d.hidden is not None and d.hidden.shape == (d_model,) for d in decisions)  # the model's d_model
    tokens = len(decisions) // layers
    common = ("--workload", "replay", "--trace", trace, "--layered", "--tokens", tokens, "--compute-workers", 1)
    gate = run_pipeline(leak_guard, store, *common, "--cache-slots", cache_slots, "--predictors", "gate",
                        "--gate-model", tiny_model_path(), "--predict-fanout", FANOUT, workdir=tmp_path).check_ok()
    none = run_pipeline(leak_guard, store, *common, "--cache-slots", cache_slots + FANOUT, "--no-prefetch",
                        workdir=tmp_path).check_ok()
    entry = gate.summary["predictors"]["gate"]
    print(f"\ngate replay: {gate.summary['demand_misses']} demand misses, {gate.summary['prefetch_joins']} joins; "
          f"no prefetch (same arena): {none.summary['demand_misses']}; per layer: "
          + ", ".join(f"L{layer['layer']} top-k {layer['topk_accuracy_pct']:.0f}%" for layer in entry["per_layer"]))
    assert gate.summary["pool_slots"] == none.summary["pool_slots"] == cache_slots + FANOUT
    assert entry["issued"] > 0 and entry["used"] > 0
    assert [layer["layer"] for layer in entry["per_layer"]] == list(range(1, layers))
    assert all(layer["predictions"] == tokens for layer in entry["per_layer"])
    assert entry["topk_accuracy_pct"] > 30.0  # the model's own gates on its own residuals: far above 2 of 8 by chance
    assert gate.summary["demand_misses"] < none.summary["demand_misses"]


def test_gate_replays_refuse_what_they_cannot_do(leak_guard, replay_setup, pipeline_stores, tmp_path):
    root, store = replay_setup
    plain = record(leak_guard, root, "plain.jsonl")
    replay = ("--workload", "replay", "--trace", plain, "--layered", "--tokens", 4, "--predictors", "gate")
    no_model = run_pipeline(leak_guard, store, *replay, workdir=tmp_path)
    assert no_model.returncode == 1 and "--gate-model MODEL.gguf" in no_model.stderr
    no_residuals = run_pipeline(leak_guard, store, *replay, "--gate-model", tiny_model_path(), workdir=tmp_path)
    assert no_residuals.returncode == 1
    assert f"{plain}: the trace holds no residuals" in no_residuals.stderr and "--record-hidden" in no_residuals.stderr
    flat = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 4, "--predictors", "gate", "--gate-model",
                        tiny_model_path(), workdir=tmp_path)
    assert flat.returncode == 1 and "use --workload replay --trace FILE --layered" in flat.stderr
    wrong_store = run_pipeline(leak_guard, pipeline_stores["tiny"], "--workload", "replay", "--trace", plain,
                               "--layered", "--tokens", 4, workdir=tmp_path)
    assert wrong_store.returncode == 1 and "does not fit this run" in wrong_store.stderr
    markov_only = run_pipeline(leak_guard, store, *replay[:-2], "--gate-model", tiny_model_path(), workdir=tmp_path)
    assert markov_only.returncode == 1 and "has no gate" in markov_only.stderr
