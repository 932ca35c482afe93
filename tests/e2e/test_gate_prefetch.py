"""The next-layer gate predictor end to end: `mer-pipeline generate --predictors gate` on the embedded
trained model (6 MoE layers x 8 experts, top-2) with a cache of a quarter of its experts.

Checked against `--no-prefetch` runs with the same arena (cache 8 + the prefetch reserve of
`--predict-fanout` slots) and with the same cache (12): the generated tokens are identical, and the
demand misses (lookups whose read the foreground had to start) drop by at least 30%. The gate's
per-layer accuracies are in the summary (`predictors.gate.per_layer`, within 0..100) and in the
log (`gate_layer_accuracy`). A benchmark run cannot use the gate (no model): a clear ConfigError.
The measured figures are printed (`pytest -s`).
"""

from __future__ import annotations

from mer.models import tiny_model_path
from tests.support.embedded_model import embedded_geometry
from tests.support.generate_runs import run_generate
from tests.support.pipeline_runs import run_pipeline
import pytest

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "def "
TOKENS = 48
CACHE_SLOTS = 12  # a quarter of the model's 48 experts
FANOUT = 4  # hints per predicted layer: the arena holds CACHE_SLOTS + FANOUT slots
COMMON = ("--prompt", PROMPT, "-n", TOKENS, "--ignore-eos", "--compute-workers", 1)


def generate(leak_guard, tmp_path, *flags):
    run = run_generate(leak_guard, tiny_model_path(), *COMMON, *flags, workdir=tmp_path,
                       cache_dir=tmp_path / "cache")
    return run, run.result


def lookups_line(name: str, result: dict) -> str:
    return (f"{name}: {result['hits']} hits, {result['prefetch_joins']} joined a prefetch, "
            f"{result['demand_misses']} demand misses of {result['lookups']} lookups")


@pytest.mark.heavy
def test_gate_prefetch_cuts_demand_misses_without_changing_the_tokens(leak_guard, tmp_path):
    gate_run, gate = generate(leak_guard, tmp_path, "--cache-slots", CACHE_SLOTS, "--predictors", "gate",
                              "--predict-fanout", FANOUT)
    _, same_arena = generate(leak_guard, tmp_path, "--cache-slots", CACHE_SLOTS + FANOUT, "--no-prefetch")
    _, same_cache = generate(leak_guard, tmp_path, "--cache-slots", CACHE_SLOTS, "--no-prefetch")

    entry = gate["predictors"]["gate"]
    print()
    for name, result in (("gate", gate), ("no prefetch, same arena", same_arena), (f"no prefetch, cache {CACHE_SLOTS}", same_cache)):
        print(lookups_line(name, result))
    for layer in entry["per_layer"]:
        print(f"gate layer {layer['layer']} ({layer['ahead']} ahead): top-k {layer['topk_accuracy_pct']:.1f}%, "
              f"top-1 {layer['top1_accuracy_pct']:.1f}%, hinted recall {layer['hinted_recall_pct']:.1f}%")

    assert gate["tokens"] == same_arena["tokens"] == same_cache["tokens"]
    assert len(gate["tokens"]) == TOKENS
    for result in (gate, same_arena, same_cache):
        assert result["hits"] + result["prefetch_joins"] + result["demand_misses"] == result["lookups"]
    assert same_arena["prefetch_joins"] == same_cache["prefetch_joins"] == 0
    assert gate["demand_misses"] <= 0.7 * same_arena["demand_misses"], (gate, same_arena)
    assert gate["demand_misses"] <= 0.7 * same_cache["demand_misses"], (gate, same_cache)

    assert list(gate["predictors"]) == ["gate"] and entry["issued"] > 0 and entry["used"] > 0
    moe_layers = embedded_geometry().moe_layers
    assert [(layer["layer"], layer["ahead"]) for layer in entry["per_layer"]] == [(layer, 1) for layer in range(1, moe_layers)]
    for layer in entry["per_layer"]:
        assert layer["predictions"] >= TOKENS - 1  # every decode step (and the prompt's tokens)
        assert layer["topk_observed"] == 2 * layer["predictions"]  # top-2 routing
        for key in ("top1_accuracy_pct", "topk_accuracy_pct", "hinted_recall_pct"):
            assert 0.0 <= layer[key] <= 100.0, (key, layer)
    assert 0.0 < entry["topk_accuracy_pct"] <= 100.0 and 0.0 < entry["top1_accuracy_pct"] <= 100.0
    logged = gate_run.events_named("gate_layer_accuracy")
    assert [{key: event[key] for key in layer} for event in logged] == entry["per_layer"]
    ready = [event for event in gate_run.events_named("child_ready") if event.get("predictor")]
    assert ready and ready[0]["gate_model"] == str(tiny_model_path())


def test_the_benchmark_refuses_the_gate_predictor(leak_guard, pipeline_stores, tmp_path):
    run = run_pipeline(leak_guard, pipeline_stores["tiny"], "--tokens", 5, "--predictors", "markov,gate",
                       workdir=tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert "ConfigError" not in run.stderr  # mer's own error, said plainly
    assert "predictors = 'markov,gate'" in run.stderr and "benchmark job has no model" in run.stderr


@pytest.mark.heavy
def test_with_the_layer_policy_the_gate_pays_without_its_floor(leak_guard, tmp_path):
    """`--cache-policy layer` never evicts an expert of a layer still ahead in the token first, so even
    the gate's unlikely hints stop evicting what the next layers need (with LRU they cost more than
    they save: see the module doc and docs/pipeline.md)."""
    _, gate = generate(leak_guard, tmp_path, "--cache-slots", CACHE_SLOTS, "--predictors", "gate",
                       "--predict-fanout", FANOUT, "--gate-min-ratio", 0, "--cache-policy", "layer")
    _, lru = generate(leak_guard, tmp_path, "--cache-slots", CACHE_SLOTS + FANOUT, "--no-prefetch",
                      "--cache-policy", "lru")
    _, layer = generate(leak_guard, tmp_path, "--cache-slots", CACHE_SLOTS + FANOUT, "--no-prefetch",
                        "--cache-policy", "layer")
    print(f"\n{lookups_line('gate, no floor, layer policy', gate)}\n{lookups_line('no prefetch, LRU', lru)}\n"
          f"{lookups_line('no prefetch, layer policy', layer)}")
    assert gate["tokens"] == lru["tokens"] == layer["tokens"]
    assert layer["demand_misses"] < lru["demand_misses"]  # the policy alone helps a little ...
    assert gate["demand_misses"] <= 0.7 * layer["demand_misses"]  # ... the gate's prefetches much more
