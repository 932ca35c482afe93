"""`mer-pipeline logs` on the logs of other commands than `run`: a real `generate` (tiny MoE GGUF, graph
of real processes) and a real `convert --log-file`.

Checked: `logs summarize` names the kind of each log; a generation's figures (prefill and decode
tokens/s, hit rates, MiB read per token, time per MoE block) equal those this test computes from
the log's raw events with its own code, and those `generate --json` printed; the same log cut
before its end is summarized as interrupted, with a warning; `logs plot` puts time zero at the
prefill's start (not at the supervisor's first event); a conversion's experts, tensors (counted in
the GGUF with the `gguf` library), bytes and duration; a log with nothing to summarize is named.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from gguf import GGUFReader

from mer.logs.runs import load_runs
from mer.logs.series import outstanding_reads, time_axis_label, time_origin, worker_busy
from tests.support.generate_runs import run_generate
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import MER_PIPELINE, read_json_lines

pytestmark = pytest.mark.slow  # starts the process graph

CLI_TIMEOUT_S = 120
PROMPT = "hello world this is a test of the experts"
STEPS = 6
MIB = 2**20


def logs(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, "logs", *map(str, arguments)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def named(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event["event"] == name]


def expected_generation(events: list[dict]) -> dict:
    """The generation's figures, computed here from the raw events (docs/events.md)."""
    prompt = named(events, "generation_started")[0]["prompt_tokens"]
    prefill = named(events, "generation_prefill_done")[0]
    decode = named(events, "generation_decode_done")[0]
    blocks = named(events, "moe_block_done")
    decode_blocks = [block for block in blocks if block["token"] >= prompt]
    prefill_blocks = [block for block in blocks if block["token"] < prompt]
    counted = named(events, "io_stats_sent")[-1]["reads"]
    reads = [read for read in named(events, "expert_read") if read["read_index"] < counted]
    steps = len(decode_blocks) // 2  # two MoE layers per pass
    decode_bytes = sum(read["nbytes"] for read in reads if read["token"] >= prompt)

    def rate(chosen):
        lookups = sum(block["hits"] + block["misses"] for block in chosen)
        return 100.0 * sum(block["hits"] for block in chosen) / lookups

    return {
        "prompt_tokens": prompt, "tokens": len(named(events, "generation_token")), "decode_steps": steps,
        "prefill_tps": prompt / (prefill["t_end"] - prefill["t_start"]),
        "decode_tps": steps / (decode["t_end"] - decode["t_start"]),
        "hits": sum(block["hits"] for block in blocks), "misses": sum(block["misses"] for block in blocks),
        "hit_rate_pct": rate(blocks), "prefill_hit_rate_pct": rate(prefill_blocks),
        "decode_hit_rate_pct": rate(decode_blocks),
        "reads": len(reads), "bytes_read": sum(read["nbytes"] for read in reads), "decode_bytes_read": decode_bytes,
        "mib_read_per_token": decode_bytes / MIB / steps, "moe_blocks": len(decode_blocks),
        "dense_us_per_block": sum(block["dense_us"] for block in decode_blocks) / len(decode_blocks),
        "expert_us_per_block": sum(block["expert_us"] for block in decode_blocks) / len(decode_blocks),
        "io_wait_us_per_block": sum(block["io_wait_us"] for block in decode_blocks) / len(decode_blocks),
    }


def test_a_generation_log_is_summarized_from_its_events_and_plotted_from_its_prefill(leak_guard, tmp_path):
    model = write_tiny_moe_gguf(tmp_path / "model.gguf", arch="llama", dtypes=("q8_0",) * 3, n_layers=2,
                                n_experts=8, top_k=2, d_model=64, d_ff=128, vocab_size=384, seed=4)
    run = run_generate(leak_guard, model.path, "--prompt", PROMPT, "-n", STEPS + 1, "--ignore-eos",
                       "--cache-slots", 3, "--compute-workers", 1, workdir=tmp_path, cache_dir=tmp_path / "cache")
    result = run.result
    events = read_json_lines(run.log_path)
    expected = expected_generation(events)
    assert expected["decode_steps"] == STEPS == result["decode_steps"] and expected["reads"] > 0

    summarized = logs("summarize", run.log_path, "--json")
    assert summarized.returncode == 0, summarized.stderr
    assert summarized.stderr == ""  # the recomputed figures agree with the logged generation_summary
    data = json.loads(summarized.stdout)
    assert data["kind"] == "generate" and data["stop_reason"] == "max_tokens"
    for key, value in expected.items():
        assert math.isclose(data[key], value, rel_tol=1e-9), key
    for key in ("prefill_tps", "decode_tps", "hit_rate_pct", "decode_hit_rate_pct", "mib_read_per_token",
                "bytes_read", "decode_bytes_read", "hits", "misses"):
        assert data[key] == result[key], key  # the same clock readings and counts as the run's own summary
    assert data["prompt_tokens"] == len(result["prompt_tokens"]) and data["tokens"] == len(result["tokens"])
    assert math.isclose(data["dense_us_per_block"], result["dense_us_per_block"], rel_tol=1e-9)

    text = logs("summarize", run.log_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "log kind: generate (a generation (mer-pipeline generate / up --model))"
    assert f"decode: {STEPS} steps in " in text.stdout and f"{data['decode_tps']:.1f} tok/s" in text.stdout
    assert f"{data['mib_read_per_token']:.3f} MiB read per token" in text.stdout

    # the same log cut before the generation's end: an interrupted generation
    lines = run.log_path.read_text().splitlines(keepends=True)
    cut = next(index for index, line in enumerate(lines) if '"generation_decode_done"' in line)
    interrupted = tmp_path / "interrupted.jsonl"
    interrupted.write_text("".join(lines[:cut]))
    partial = logs("summarize", interrupted, "--json")
    assert partial.returncode == 0, partial.stderr
    assert "no generation_decode_done event: the generation did not finish" in partial.stderr
    cut_data = json.loads(partial.stdout)
    assert cut_data["stop_reason"] == "interrupted" and cut_data["decode_steps"] == STEPS
    assert cut_data["hits"] == data["hits"] and cut_data["reads"] >= data["reads"]

    # plots: time zero is the prefill's start
    (log,) = load_runs(str(run.log_path))
    prefill = named(events, "generation_prefill_done")[0]
    assert time_origin(log) == prefill["t_start"] and time_axis_label(log) == "time since the prefill started (s)"
    span = named(events, "generation_decode_done")[0]["t_end"] - prefill["t_start"]
    depth = outstanding_reads(log)
    assert depth.t_s and 0 <= min(depth.t_s) and max(depth.t_s) <= span + 1.0  # a late prefetch may finish after
    assert all(0 <= start <= end for lane in worker_busy(log) for start, end in lane.intervals)
    plotted = logs("plot", run.log_path, "--out", tmp_path / "plots")
    assert plotted.returncode == 0, plotted.stderr
    assert [Path(line).name for line in plotted.stdout.splitlines()] == [
        "slot_occupancy.png", "io_queue_depth.png", "read_latency_histogram.png", "worker_busy.png", "prefetch.png"]
    assert "cycle_latency.png not written: no token_done events (a benchmark's tokens" in plotted.stderr


def expert_tensors(path: Path) -> int:
    """The GGUF's expert tensors (merged `blk.N.ffn_{gate,up,down}_exps.weight`), counted with `gguf`."""
    return sum(1 for tensor in GGUFReader(path).tensors if tensor.name.endswith("_exps.weight"))


def test_a_conversion_log_is_summarized(tmp_path):
    model = write_tiny_moe_gguf(tmp_path / "model.gguf", arch="qwen3moe", dtypes=("q4_0",) * 3, n_layers=3,
                                n_experts=8, top_k=2, tokenizer="bpe", vocab_size=384, seed=5)
    log_path = tmp_path / "convert.jsonl"
    converted = subprocess.run([MER_PIPELINE, "convert", str(model.path), "--out", str(tmp_path / "store"), "--json",
                                "--quiet", "--log-file", str(log_path)], capture_output=True, text=True,
                               timeout=CLI_TIMEOUT_S)
    assert converted.returncode == 0, converted.stderr
    assert converted.stderr == ""  # the events went to the log file
    result = json.loads(converted.stdout)
    events = read_json_lines(log_path)
    layers = named(events, "convert_layer_done")
    assert len(layers) == 3

    summarized = logs("summarize", log_path, "--json")
    assert summarized.returncode == 0, summarized.stderr
    data = json.loads(summarized.stdout)
    assert data["kind"] == "convert" and data["finished"] is True
    assert data["experts"] == result["experts"] == 3 * 8
    assert data["bytes"] == result["bytes"] == sum(layer["bytes"] for layer in layers)
    assert data["tensors"] == expert_tensors(model.path) == 9
    assert data["seconds"] == result["seconds"] > 0
    assert data["mb_per_s"] == result["bytes"] / 1e6 / result["seconds"]
    text = logs("summarize", log_path)
    assert text.stdout.splitlines()[0] == "log kind: convert (a conversion (mer-pipeline convert))"
    assert f"written: 24 experts from 9 tensors, {result['bytes'] / MIB:.2f} MiB" in text.stdout

    (log,) = load_runs(str(log_path))
    assert time_origin(log) == named(events, "convert_started")[0]["t_start"]


def test_a_log_with_nothing_to_summarize_says_what_it_holds(tmp_path):
    log_path = tmp_path / "other.jsonl"
    log_path.write_text(json.dumps({"event": "child_stopped", "schema": 1, "t_mono": 1.0, "pid": 7}) + "\n")
    result = logs("summarize", log_path)
    assert result.returncode == 1 and result.stdout == ""
    assert (f"{log_path}: log kind unknown (no run, generation, perplexity run or conversion): no run_started, "
            "generation_started, perplexity_started or convert_started event, nothing to summarize "
            "(events: child_stopped)") in result.stderr
