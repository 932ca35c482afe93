"""Checks shared by the architecture tests of the console scripts (tests/e2e/test_{deepseek2,glm4moe}_cli.py).

- `convert_json`: `mer-pipeline convert MODEL --out DIR --json`, its JSON object and the store's manifest;
- `assert_generate_matches_references`: `generate --json` with the gate predictor and a small expert
  cache gives the single-process model's greedy tokens and llama.cpp's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.store.manifest import Manifest
from mer.store.reader import ExpertStore
from tests.support.generate_runs import run_generate
from tests.support.pipeline_runs import MER_PIPELINE


def convert_json(model: Path, store: Path) -> tuple[dict[str, Any], Manifest]:
    done = subprocess.run([str(MER_PIPELINE), "convert", str(model), "--out", str(store), "--json", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), ExpertStore.open(store).manifest


def assert_generate_matches_references(guard, model: Path, prompt: str, steps: int, cache_slots: int,  # type: ignore[no-untyped-def]
                                       min_distinct: int, workdir: Path) -> dict[str, Any]:
    """`generate --json` of `steps` greedy tokens with 1 compute worker, `cache_slots` slots and the gate
    predictor (fanout 2): the single-process model's tokens, misses and hits, hints issued and used and
    ranking as the router routes (one MoE layer ahead of another), and llama.cpp's tokens. Returns the JSON."""
    run = run_generate(guard, model, "--prompt", prompt, "-n", steps, "--ignore-eos", "--compute-workers", 1,
                       "--cache-slots", cache_slots, "--predictors", "gate", "--predict-fanout", 2,
                       workdir=workdir, cache_dir=workdir / "cache")
    assert run.returncode == 0, run.stderr
    result = run.result
    single = MoEModel.load(model)
    reference = generate(single, result["prompt_tokens"], steps, Sampler(), GGUFExperts(single.source), ignore_eos=True)
    assert result["tokens"] == reference.tokens and len(set(result["tokens"])) >= min_distinct
    assert result["misses"] > 0 and result["hits"] > 0  # a few slots for all the experts
    gate = result["predictors"]["gate"]
    assert gate["issued"] > 0 and gate["used"] > 0
    assert [(layer["layer"], layer["ahead"]) for layer in gate["per_layer"]] == [(1, 1)]
    assert all(layer["topk_accuracy_pct"] > 0 for layer in gate["per_layer"])  # it ranks as the router routes
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import llama_greedy, open_llama

    theirs, _ = llama_greedy(open_llama(model), result["prompt_tokens"], steps)
    assert result["tokens"] == theirs
    return result
