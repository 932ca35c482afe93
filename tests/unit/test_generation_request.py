"""The generation job shipped to the router, and what the CLI prints of it."""

from __future__ import annotations

import io

import pytest

from mer.cli.generation_output import TextStream, experts_line, timing_line
from mer.errors import ConfigError
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from mer.router.generation_request import BENCHMARK_KIND, GENERATE_KIND, GenerationRequest, job_kind
from tests.gguf_models import write_tiny_moe_gguf


def test_a_request_survives_the_job_dict_and_its_kind_is_read():
    request = GenerationRequest("/m.gguf", (1, 5, 9), 16, temperature=0.7, top_k=40, top_p=0.9, seed=3,
                                ignore_eos=True, end_ids=(2,), dump_logits="/tmp/l.npy")
    job = request.to_job()
    assert job["kind"] == GENERATE_KIND and job["prompt_tokens"] == [1, 5, 9]
    assert GenerationRequest.from_job(job) == request
    assert job_kind(job) == GENERATE_KIND and job_kind({}) == BENCHMARK_KIND
    with pytest.raises(ConfigError, match="kind"):
        job_kind({"kind": "serve"})


@pytest.mark.parametrize("job, message", [
    ({"model": "m", "prompt_tokens": [1], "max_tokens": 4, "colour": 1}, "unknown keys"),
    ({"model": "m", "max_tokens": 4}, "missing keys"),
    ({"model": "m", "prompt_tokens": [], "max_tokens": 4}, "prompt is empty"),
    ({"model": "m", "prompt_tokens": [1, -2], "max_tokens": 4}, "token ids"),
    ({"model": "m", "prompt_tokens": [1], "max_tokens": -1}, "max_tokens"),
])
def test_a_bad_job_dict_is_a_config_error_naming_the_field(job, message):
    with pytest.raises(ConfigError, match=message):
        GenerationRequest.from_job(job)


def test_text_streams_whole_characters_only(tmp_path):
    tokenizer = load_tokenizer(MoEModel.load(write_tiny_moe_gguf(tmp_path / "m.gguf", n_layers=1).path).source.parts[0])
    snowman = [tokenizer.piece_ids[f"<0x{byte:02X}>"] for byte in "☃".encode()]  # three byte tokens
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    stream.add(0, snowman[0])
    stream.add(1, snowman[1])
    assert out.getvalue() == ""  # half a character waits
    stream.add(2, snowman[2])
    assert out.getvalue() == "☃"
    stream.add(3, snowman[0])
    stream.finish()
    assert out.getvalue() == "☃\ufffd\n"  # an unfinished character at the end is replaced


def test_the_timing_line_names_speeds_hit_rate_and_bytes():
    summary = {"prompt_tokens": [1, 2, 3], "tokens": [4, 5], "decode_steps": 1, "prefill_tps": 120.5,
               "decode_tps": 33.25, "hit_rate_pct": 75.0, "mib_read_per_token": 1.5, "dense_us_per_block": 900.0,
               "expert_us_per_block": 2100.0, "stop_reason": "max_tokens"}
    assert timing_line(summary) == ("prefill 3 tokens 120.5 tok/s, decode 1 steps 33.2 tok/s, hit rate 75.0%, "
                                    "1.50 MiB read per token; per MoE block: dense 900 us, experts 2100 us; "
                                    "2 tokens, stop: max_tokens")


def test_the_experts_line_splits_the_lookups_and_gives_each_predictors_accuracy_per_layer():
    summary = {"lookups": 400, "hits": 289, "prefetch_joins": 2, "demand_misses": 109, "predictors": {}}
    assert experts_line(summary) == "experts: 400 lookups, 289 hits, 2 joined a prefetch read, 109 demand misses"
    layer = {"layer": 2, "ahead": 1, "topk_accuracy_pct": 57.7, "top1_accuracy_pct": 94.23}
    summary["predictors"] = {"gate": {"top1_accuracy_pct": 70.0, "topk_accuracy_pct": 47.44, "used": 67, "issued": 96,
                                      "per_layer": [layer, {**layer, "layer": 3, "ahead": 2}]}}
    assert experts_line(summary).endswith(
        "109 demand misses; gate: top-1 70.0%, top-k 47.4%, 67/96 prefetches used "
        "(per layer top-k/top-1: layer 2 57.7/94.2%, layer 3 (2 ahead) 57.7/94.2%)")
