"""`mer-pipeline up` with no arguments: the embedded trained model generates a completion through the
real process graph with an expert cache of half its experts, prints the prompt and completion as one
block and one summary line, and exits by itself without a terminal. Its tokens are the single-process
reference's, and the same as with a cache holding every expert."""

from __future__ import annotations

import json
import re

from mer.cli.up_command import DEMO_GENERATED_TOKENS, EMBEDDED_DEMO_PROMPT, demo_cache_slots
from mer.cli.worker_choice import compute_workers_for_model
from mer.compute.slicing import DEFAULT_SLICES, plan_slices
from mer.config import available_core_count
from mer.model.hparams import read_hparams
from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from tests.support.generate_runs import run_cli_to_end
from tests.support.pipeline_runs import MER_PIPELINE, read_json_lines
import pytest

pytestmark = pytest.mark.slow  # starts the process graph

SUMMARY_LINE = re.compile(r"^(?P<tokens>\d+) tokens: decode (?P<tps>[\d.]+) tok/s, hit rate (?P<hit>[\d.]+)%, "
                          r"(?P<mib>[\d.]+) MiB read per token, cache (?P<cache>\d+) of (?P<experts>\d+) experts$")


def reference_tokens() -> tuple[list[int], object]:
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    expected = generate(model, tokenizer.encode(EMBEDDED_DEMO_PROMPT), DEMO_GENERATED_TOKENS, Sampler(),
                        GGUFExperts(model.source), end_ids=tokenizer.end_of_generation_ids).tokens
    return list(expected), tokenizer


def compute_workers_spawned(log_path) -> int:
    return sum(event["child"].startswith("mer-compute-") for event in read_json_lines(log_path)
               if event.get("event") == "child_spawned")


def test_up_without_arguments_prints_the_prompt_and_completion_then_one_summary_line(leak_guard, tmp_path):
    log_path = tmp_path / "up.jsonl"
    returncode, stdout, stderr = run_cli_to_end(leak_guard, [MER_PIPELINE, "up", "--log-file", str(log_path)],
                                                cache_dir=tmp_path / "cache", log_path=log_path)
    assert returncode == 0, stderr
    expected, tokenizer = reference_tokens()
    # the block: the prompt, its completion, whitespace at the end trimmed, exactly one newline
    assert stdout == (EMBEDDED_DEMO_PROMPT + tokenizer.decode(expected)).rstrip() + "\n"
    assert stdout.strip() != EMBEDDED_DEMO_PROMPT.strip()  # the model did complete something
    assert "generate" not in stdout + stderr  # every message says `up`
    source = MoEModel.load(tiny_model_path()).source
    formats = [source.expert_format(layer.moe_layer) for layer in source.layers]
    workers = compute_workers_for_model(available_core_count(), formats, DEFAULT_SLICES)
    assert f"mer-pipeline up: generating {DEMO_GENERATED_TOKENS} tokens from {tiny_model_path()} after " \
           f"{EMBEDDED_DEMO_PROMPT!r} with {workers} compute worker" in stderr
    summaries = [line for line in stderr.splitlines() if "tok/s" in line]
    assert len(summaries) == 1, stderr
    figures = SUMMARY_LINE.match(summaries[0])
    assert figures is not None, summaries[0]
    model_experts = source.geometry.num_experts
    assert int(figures["tokens"]) == len(expected) and float(figures["tps"]) > 0
    assert int(figures["experts"]) == model_experts
    top_k = read_hparams(source.parts[0]).top_k
    assert int(figures["cache"]) == demo_cache_slots(model_experts, top_k) < model_experts
    assert 0 < float(figures["hit"]) < 100 and float(figures["mib"]) > 0  # the experts stream
    # the workers started: one per core, but no more than the experts have d_ff slices (today's d_ff 256: one)
    chosen = [event for event in read_json_lines(log_path) if event.get("event") == "compute_workers_chosen"]
    assert len(chosen) == 1 and chosen[0]["d_ff"] == max(item.d_ff for item in formats)
    assert chosen[0]["with_work"] == max(len(plan_slices(item, DEFAULT_SLICES)) for item in formats)
    assert chosen[0]["available"] == available_core_count() and chosen[0]["chosen"] == workers
    assert compute_workers_spawned(log_path) == workers


def test_the_demo_cache_gives_the_tokens_of_a_cache_holding_every_expert(leak_guard, tmp_path):
    """Greedy tokens do not depend on the cache's size; an explicit --compute-workers is kept as given."""
    runs = {}
    explicit_workers = min(2, available_core_count())
    for name, flags in (("demo", []), ("full", ["--cache-slots", "1000", "--compute-workers", str(explicit_workers)])):
        log_path = tmp_path / f"{name}.jsonl"
        argv = [MER_PIPELINE, "up", "--json", "--log-file", str(log_path), *flags]
        returncode, stdout, stderr = run_cli_to_end(leak_guard, argv, cache_dir=tmp_path / "cache", log_path=log_path)
        assert returncode == 0, stderr
        runs[name] = (json.loads(stdout), log_path)
    expected, _ = reference_tokens()
    demo, demo_log = runs["demo"]
    full, full_log = runs["full"]
    assert demo["tokens"] == full["tokens"] == expected
    assert full["reads"] <= MoEModel.load(tiny_model_path()).source.geometry.num_experts  # each expert read once
    assert demo["reads"] > full["reads"] and demo["hit_rate_pct"] < full["hit_rate_pct"]
    assert compute_workers_spawned(full_log) == explicit_workers  # given explicitly: not fitted to the model
    assert not [event for event in read_json_lines(full_log) if event.get("event") == "compute_workers_chosen"]
    source = MoEModel.load(tiny_model_path()).source
    formats = [source.expert_format(layer.moe_layer) for layer in source.layers]
    assert compute_workers_spawned(demo_log) == compute_workers_for_model(available_core_count(), formats,
                                                                          DEFAULT_SLICES)
