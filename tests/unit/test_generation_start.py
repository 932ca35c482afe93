"""The generation's start message shipped to the router, its typed summary, and what the CLI prints of it."""

from __future__ import annotations

import io

import msgpack
import pytest

from mer.cli.generate_command import TextStream, experts_line, timing_line
from mer.errors import ConfigError, EventLogError, ProtocolError
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from mer.protocol import StartBenchmark, StartGeneration, decode, encode
from mer.metrics.summary import GenerationSummary
from mer.runtime.supervisor import job_model
from tests.support.gguf_models import write_tiny_moe_gguf


def test_a_start_message_survives_the_wire_and_names_the_model():
    start = StartGeneration("/m.gguf", [1, 5, 9], 16, temperature=0.7, top_k=40, top_p=0.9, seed=3,
                            ignore_eos=True, end_ids=[2], dump_logits="/tmp/l.npy")
    assert decode(encode(start)) == start
    defaults = StartGeneration("/m.gguf", [1], 4)
    assert decode(encode(defaults)) == defaults and defaults.seed is None and defaults.dump_logits is None
    assert job_model(start) == "/m.gguf" and job_model(StartBenchmark()) is None


def test_a_bad_start_message_on_the_wire_is_a_protocol_error_naming_the_field():
    header, body = encode(StartGeneration("/m.gguf", [1], 4))
    fields = msgpack.unpackb(body)
    with pytest.raises(ProtocolError, match=r"StartGeneration\.seed: expected an integer, got str"):
        decode([header, msgpack.packb(fields[:6] + ["x"] + fields[7:])])
    with pytest.raises(ProtocolError, match="StartGeneration: the prompt is empty"):
        decode([header, msgpack.packb(fields[:1] + [[]] + fields[2:])])


@pytest.mark.parametrize("fields, message", [
    ({"prompt_tokens": [], "max_tokens": 4}, "prompt is empty"),
    ({"prompt_tokens": [1, -2], "max_tokens": 4}, "prompt_tokens must be token ids"),
    ({"prompt_tokens": [1], "max_tokens": 4, "end_ids": [True]}, "end_ids must be token ids"),
    ({"prompt_tokens": [1], "max_tokens": -1}, "max_tokens"),
])
def test_a_bad_start_message_is_a_config_error_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        StartGeneration("m", **fields)


def summary_fields(**changes) -> dict:
    values = {"prompt_tokens": [1, 2, 3], "tokens": [4, 5], "stop_reason": "max_tokens", "prefill_s": 0.1,
              "decode_s": 0.2, "decode_steps": 1, "prefill_tps": 30.0, "decode_tps": 5.0, "hits": 3, "misses": 1,
              "lookups": 4, "prefetch_joins": 1, "demand_misses": 0, "hit_rate_pct": 75.0, "prefill_hit_rate_pct": 50.0,
              "decode_hit_rate_pct": 100.0, "reads": 2,
              "bytes_read": 8192, "decode_bytes_read": 4096, "mib_read_per_token": 0.00390625,
              "prefetches_issued": 1, "prefetches_used": 1, "prefetches_wasted": 0, "predictor_observations": 8,
              "predictors": {"markov": {"hints": 3}}, "dense_us_per_block": 900.0, "expert_us_per_block": 2100.0,
              "io_wait_us_per_block": 10.0, "expert_compute_us_per_block": 1500.0, "other_us_per_token": 50.0,
              "cache_slots": 4, "compute_workers": 2, "io_backend": "preadv"}
    return {**values, **changes}


def test_the_generation_summary_round_trips_its_json_keys():
    summary = GenerationSummary(**summary_fields())
    data = summary.to_json_dict()
    assert list(data)[:4] == ["kind", "prompt_tokens", "tokens", "stop_reason"] and data["kind"] == "generate"
    assert GenerationSummary.from_json_dict(data) == summary
    with pytest.raises(EventLogError, match=r"missing fields \['decode_tps'\]"):
        GenerationSummary.from_json_dict({key: value for key, value in data.items() if key != "decode_tps"})


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
               "decode_tps": 33.25, "hit_rate_pct": 75.0, "prefill_hit_rate_pct": 62.5,
               "decode_hit_rate_pct": 87.5, "mib_read_per_token": 1.5, "dense_us_per_block": 900.0,
               "expert_us_per_block": 2100.0, "stop_reason": "max_tokens"}
    assert timing_line(summary) == ("prefill 3 tokens 120.5 tok/s, decode 1 steps 33.2 tok/s, hit rate prefill 62.5% decode 87.5%, "
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
