"""`mer-pipeline generate` end to end: the console script, real processes, a tiny model converted implicitly.

Checked: the text streams to stdout while the graph still runs and equals the decoded tokens of the
single-process model, the timing line on stderr; `--json` (its keys, the completion text, BOS from
the vocabulary, `--prompt-tokens` used as given); stopping on the end-of-generation id (and not with
`--ignore-eos`); `--chat` with the GGUF's chat template; `--ram-budget`: the graph's total resident
memory (sum of Pss of the CLI and all its descendants) stays within the budget, with a cache smaller
than the model's experts, and a budget below one layer's experts is refused with the numbers. Bad
input (a dense GGUF, an unsupported architecture, a truncated GGUF, a prompt longer than the context,
a RAM budget too small) and a store file truncated or missing before the run: a clear error, exit != 0,
nothing on stdout, and (the leak guard) no process or /dev/shm segment left behind. Every run has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from mer.cli.up_command import DEMO_PROMPT
from mer.store.demo import converted_store
from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.store.manifest import Manifest
from tests.support.generate_runs import GENERATE_TIMEOUT_S, generate_argv, run_generate
from tests.support.pipeline_runs import MER_PIPELINE, run_ids_in_log
from tests.support.gguf_models import write_tiny_moe_gguf

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "hello world this is a test of the experts"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TIMING_LINE = re.compile(r"prefill \d+ tokens [\d.]+ tok/s, decode \d+ steps [\d.]+ tok/s, hit rate prefill [\d.]+% decode [\d.]+%, "
                         r"[\d.]+ MiB read per token; per MoE block: dense \d+ us, experts \d+ us; "
                         r"\d+ tokens, stop: \w+")
JSON_KEYS = {"prompt_tokens", "tokens", "text", "prefill_tps", "decode_tps", "hit_rate_pct", "prefill_hit_rate_pct",
             "decode_hit_rate_pct", "mib_read_per_token",
             "stop_reason", "dense_us_per_block", "expert_us_per_block"}


def write_model(path: Path, **overrides):
    arguments = dict(arch="llama", dtypes=("q8_0",) * 3, n_layers=2, n_experts=8, top_k=2, d_model=64, d_ff=128,
                     vocab_size=384, seed=4)
    return write_tiny_moe_gguf(path, **{**arguments, **overrides})


def greedy_reference(path: Path, prompt: list[int], steps: int) -> list[int]:
    model = MoEModel.load(path)
    return generate(model, prompt, steps, Sampler(), GGUFExperts(model.source), ignore_eos=True).tokens


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def test_text_streams_to_stdout_while_generating_then_the_timing_line(leak_guard, tmp_path, cache_dir):
    info = write_model(tmp_path / "model.gguf")
    argv = generate_argv(info.path, "--prompt", PROMPT, "-n", 400, "--ignore-eos", "--compute-workers", 1,
                         log_path=tmp_path / "log.jsonl", as_json=False)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    leak_guard.add_supervisor_pid(process.pid)
    try:
        first = os.read(process.stdout.fileno(), 1)  # unbuffered: blocks until the first text arrives
        still_running = process.poll() is None
        rest, stderr = process.communicate(timeout=GENERATE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert still_running, "text must reach stdout while the graph generates, not at the end"
    stdout = (first + rest).decode()
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    prompt = tokenizer.encode(PROMPT)
    expected = greedy_reference(info.path, prompt, 400)
    assert stdout == tokenizer.decode(expected) + "\n"
    stderr_text = stderr.decode()
    assert "converting" in stderr_text  # the first use converts the experts into the cache
    assert TIMING_LINE.search(stderr_text), stderr_text
    assert "stop: context" in stderr_text  # 400 tokens do not fit in the 256 positions


def test_json_result_and_prompt_tokens_used_as_given(leak_guard, tmp_path, cache_dir):
    info = write_model(tmp_path / "model.gguf")
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 6, "--ignore-eos", workdir=tmp_path,
                       cache_dir=cache_dir)
    result = run.result
    assert JSON_KEYS <= set(result)
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    assert result["prompt_tokens"] == [tokenizer.bos_id, *tokenizer.encode(PROMPT, add_special=False)]
    assert result["tokens"] == greedy_reference(info.path, result["prompt_tokens"], 6)
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert result["prefill_tps"] > 0 and result["decode_tps"] > 0 and 0 <= result["hit_rate_pct"] <= 100
    low, high = sorted((result["prefill_hit_rate_pct"], result["decode_hit_rate_pct"]))
    assert 0 <= low <= result["hit_rate_pct"] <= high <= 100  # the whole run's rate lies between its parts'
    assert [event["check"] for event in run.events_named("converted_store_found")] == ["converted"]
    given_run = run_generate(leak_guard, info.path, "--prompt-tokens", "17,200,5", "-n", 3, workdir=tmp_path,
                             cache_dir=cache_dir)
    given = given_run.result
    assert given["prompt_tokens"] == [17, 200, 5]
    assert given["tokens"] == greedy_reference(info.path, [17, 200, 5], 3)
    # the second start finds the store by the GGUF's fingerprint: no conversion, no full read
    assert [event["check"] for event in given_run.events_named("converted_store_found")] == ["fingerprint"]
    assert "converting" not in given_run.stderr and "full identity" not in given_run.stderr


def test_a_store_converted_by_an_older_mer_is_verified_once(leak_guard, tmp_path, cache_dir, monkeypatch):
    info = write_model(tmp_path / "model.gguf")
    monkeypatch.setenv("MER_CACHE_DIR", str(cache_dir))
    store = converted_store(info.path)
    data = json.loads((store / "manifest.json").read_text())
    del data["source"]["fingerprint"], data["source"]["stats"]  # as an older mer wrote it
    (store / "manifest.json").write_text(json.dumps(data))
    first = run_generate(leak_guard, info.path, "--prompt-tokens", "17,200,5", "-n", 2, workdir=tmp_path,
                         cache_dir=cache_dir)
    assert first.result["tokens"] == greedy_reference(info.path, [17, 200, 5], 2)
    assert "converted by an older mer, without a fingerprint: checking the full identity" in first.stderr
    assert [event["check"] for event in first.events_named("converted_store_found")] == ["full_identity"]
    assert Manifest.load(store).source.fingerprint
    second = run_generate(leak_guard, info.path, "--prompt-tokens", "17,200,5", "-n", 2, workdir=tmp_path,
                          cache_dir=cache_dir)
    assert second.result["tokens"] == first.result["tokens"]
    assert "full identity" not in second.stderr and "converting" not in second.stderr
    assert [event["check"] for event in second.events_named("converted_store_found")] == ["fingerprint"]


def test_generation_stops_on_the_end_of_generation_token(leak_guard, tmp_path, cache_dir):
    plain = write_model(tmp_path / "plain.gguf")
    prompt = load_tokenizer(MoEModel.load(plain.path).source.parts[0]).encode(PROMPT)
    continuation = greedy_reference(plain.path, prompt, 12)
    stop = next(index for index in range(3, 12) if continuation[index] not in continuation[:index])
    info = write_model(tmp_path / "eos.gguf", metadata_overrides={"tokenizer.ggml.eos_token_id": continuation[stop]})
    result = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 12, workdir=tmp_path,
                          cache_dir=cache_dir).result
    assert result["tokens"] == continuation[: stop + 1] and result["stop_reason"] == "end_of_generation"
    ignoring = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 12, "--ignore-eos", workdir=tmp_path,
                            cache_dir=cache_dir).result
    assert ignoring["tokens"] == continuation and ignoring["stop_reason"] == "max_tokens"


def test_chat_renders_the_models_chat_template(leak_guard, tmp_path, cache_dir):
    info = write_model(tmp_path / "chat.gguf", arch="qwen3moe", tokenizer="bpe", vocab_size=400, chat_template=CHATML)
    result = run_generate(leak_guard, info.path, "--prompt", "hello", "--chat", "-n", 2, workdir=tmp_path,
                          cache_dir=cache_dir).result
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert result["prompt_tokens"] == tokenizer.encode(rendered, add_special=False, parse_special=True)
    assert result["prompt_tokens"][0] == tokenizer.piece_ids["<|im_start|>"]


def needed_budget_mib(stderr: str) -> float:
    match = re.search(r"needs at least ([\d,.]+) MiB", stderr)
    assert match, stderr
    return float(match.group(1).replace(",", ""))


def test_ram_budget_bounds_the_graphs_resident_memory(leak_guard, tmp_path, cache_dir):
    # a Mixtral-sized vocabulary: the GGUF's parsed metadata is a real part of the router's and the CLI's memory
    info = write_model(tmp_path / "big.gguf", d_model=256, d_ff=512, vocab_size=32000)
    refused = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 24, "--compute-workers", 2,
                           "--ram-budget", "64MiB", workdir=tmp_path, cache_dir=cache_dir)
    assert refused.returncode != 0 and refused.stdout == ""
    assert "RAM budget 64.0 MiB cannot hold the dense part" in refused.stderr
    assert "2 experts of one layer" in refused.stderr
    assert not (cache_dir / "stores").exists(), "a refused budget must not start the conversion"
    slot_mib = -(-3 * (512 * 256 // 32 * 34) // 4096) * 4096 / 2**20  # 3 q8_0 matrices, a read rounded to pages
    budget_mib = needed_budget_mib(refused.stderr) + 3.5 * slot_mib  # k + 3 slots for 16 experts
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 24, "--ignore-eos", "--compute-workers", 2,
                       "--ram-budget", f"{budget_mib:.3f}MiB", workdir=tmp_path, cache_dir=cache_dir,
                       sample_memory=True)
    result = run.result
    assert result["cache_slots"] == 2 + 3 and result["misses"] > 0
    assert result["arena_bytes"] <= budget_mib * 2**20
    print(f"budget {budget_mib:.1f} MiB, peak Pss of the graph {run.peak_pss_bytes / 2**20:.1f} MiB")
    assert 0 < run.peak_pss_bytes <= budget_mib * 2**20
    assert result["tokens"] == greedy_reference(info.path, result["prompt_tokens"], 24)


def test_with_no_cache_flags_a_model_that_fits_is_held_whole(leak_guard, tmp_path, cache_dir):
    """No --ram-budget, no --cache-slots: the budget is what the machine can give, so every expert of a
    small model gets a slot, and the decode steps find them all after the prompt (no flag needed)."""
    info = write_model(tmp_path / "m.gguf")
    run = run_generate(leak_guard, info.path, "--prompt-tokens", ",".join(str(n) for n in range(40, 72)), "-n", 12,
                       "--ignore-eos", "--no-prefetch", workdir=tmp_path, cache_dir=cache_dir)
    result = run.result
    assert result["cache_slots"] == 8 * 2  # every expert of both MoE layers
    assert "(default: " in run.stderr and "available" in run.stderr and "less headroom" in run.stderr
    assert result["ram_budget_bytes"] > 0 and result["arena_bytes"] <= result["ram_budget_bytes"]
    assert result["decode_hit_rate_pct"] == 100.0  # 32 prompt tokens touched every expert: no decode miss
    assert result["tokens"] == greedy_reference(info.path, result["prompt_tokens"], 12)
    configured = tmp_path / "four.toml"
    configured.write_text("cache_slots = 4\n")
    result = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 2, "--config", configured,
                          workdir=tmp_path, cache_dir=cache_dir).result
    assert result["cache_slots"] == 4 and result["ram_budget_bytes"] is None  # a config file's cache is kept


def rename_architecture(source: Path, target: Path, name: str) -> None:
    """A copy of a llama GGUF whose architecture (and metadata key prefix) is `name` (5 letters)."""
    data = source.read_bytes()
    value = b"general.architecture" + struct.pack("<IQ", 8, 5)
    data = data.replace(value + b"llama", value + name.encode()).replace(b"llama.", name.encode() + b".")
    target.write_bytes(data)


def write_dense_gguf(path: Path) -> None:
    from gguf import GGUFWriter
    import numpy as np

    writer = GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_feed_forward_length(128)
    for name, shape in (("token_embd.weight", (300, 64)), ("blk.0.ffn_gate.weight", (128, 64)),
                        ("blk.0.ffn_up.weight", (128, 64)), ("blk.0.ffn_down.weight", (64, 128))):
        writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


BAD_INPUTS = {
    "dense GGUF": ("not a Mixture-of-Experts model", ()),
    "unsupported architecture": ("architecture 'dbrx1' is not supported", ()),
    "truncated GGUF": ("truncated or corrupt GGUF", ()),
    "prompt longer than the context": ("more than the model's context of 16", ()),
    "RAM budget smaller than one layer's experts": ("cannot hold the dense part", ("--ram-budget", "100MiB")),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_leaves_nothing(case, leak_guard, tmp_path, cache_dir):
    message, flags = BAD_INPUTS[case]
    model = tmp_path / "model.gguf"
    if case == "dense GGUF":
        write_dense_gguf(model)
    elif case == "unsupported architecture":
        rename_architecture(write_model(tmp_path / "llama.gguf").path, model, "dbrx1")
    elif case == "truncated GGUF":
        data = write_model(tmp_path / "full.gguf").path.read_bytes()
        model.write_bytes(data[: len(data) * 2 // 3])
    elif case == "prompt longer than the context":
        write_model(model, context_length=16)
    else:
        write_model(model, d_model=256, d_ff=512)
    run = run_generate(leak_guard, model, "--prompt", PROMPT + " " + PROMPT, "-n", 4, *flags, workdir=tmp_path,
                       cache_dir=cache_dir)
    assert run.returncode != 0
    assert run.stdout == ""
    assert "mer-pipeline generate: error:" in run.stderr and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_store_file_bad_before_the_run_is_refused_at_start_naming_it(leak_guard, tmp_path, cache_dir, monkeypatch,
                                                                       damage):
    """A payload file of the cached store truncated (or deleted) before `generate` starts: the store's
    files are checked when it is opened, so the command exits 1 with one line naming the file and no
    process of the graph is started (a store truncated while the graph runs:
    tests/e2e/test_generate_integrity.py)."""
    info = write_model(tmp_path / "model.gguf")
    monkeypatch.setenv("MER_CACHE_DIR", str(cache_dir))
    store = converted_store(info.path)  # the store generate converts implicitly, found there by the GGUF's identity
    layer_file = store / Manifest.load(store).layers[1].file
    if damage == "truncated":
        os.truncate(layer_file, 4096)  # the second MoE layer's experts are gone
    else:
        layer_file.unlink()
    run = run_generate(leak_guard, info.path, "--prompt", PROMPT, "-n", 4, "--cache-slots", 2, workdir=tmp_path,
                       cache_dir=cache_dir)
    assert run.returncode == 1 and run.stdout == "", run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    reason = ("4096 bytes on disk, manifest says " if damage == "truncated"
              else "payload file listed in the manifest is missing")
    assert run.stderr.startswith(f"mer-pipeline generate: error: {layer_file}: {reason}"), run.stderr
    assert run.events_named("child_spawned") == []  # refused before any process started


def test_up_with_a_model_runs_a_short_generation_demo(leak_guard, tmp_path, cache_dir):
    info = write_model(tmp_path / "model.gguf")
    argv = [MER_PIPELINE, "up", "--model", str(info.path), "--tokens", "5", "--log-file", str(tmp_path / "up.jsonl"),
            "--json"]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_S,
                               env={**os.environ, "MER_CACHE_DIR": str(cache_dir)})
    for run_id in run_ids_in_log(tmp_path / "up.jsonl"):
        leak_guard.add_run(run_id)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    tokenizer = load_tokenizer(MoEModel.load(info.path).source.parts[0])
    assert result["prompt_tokens"] == tokenizer.encode(DEMO_PROMPT)
    assert result["tokens"] == greedy_reference(info.path, result["prompt_tokens"], 5)[: len(result["tokens"])]
    assert len(result["tokens"]) == 5 or result["stop_reason"] == "end_of_generation"


def test_a_prefill_with_pinned_slots_never_waits_forever(leak_guard, tmp_path, cache_dir):
    """A prefill routes a layer's tokens to many experts; with 2 of the 4 slots pinned (the locality
    predictor's hot experts, `--max-pinned 2`, no prefetch reserve) an `Acquire` of 4 experts that
    are not pinned could never be served (it waited forever before `router_lease_limit`). The router
    splits it into Acquires of at most 2 experts, and the generation ends with the single-process tokens."""
    from mer.models import tiny_model_path

    model_path = tiny_model_path()
    prompt = "import os, sys, re, json, time, math, random, collections, itertools, functools"
    run = run_generate(leak_guard, model_path, "--prompt", prompt, "-n", 6, "--ignore-eos", "--predictors",
                       "locality", "--max-pinned", 2, "--cache-slots", 4, "--no-prefetch", "--compute-workers", 1,
                       workdir=tmp_path, cache_dir=cache_dir, timeout_s=60)
    result = run.result
    assert result["tokens"] == greedy_reference(model_path, result["prompt_tokens"], 6)
    acquires = run.events_named("acquire_done")
    assert max(event["pinned_slots"] for event in acquires) == 2  # the pins were held while it ran
    assert max(len(event["expert_ids"]) for event in acquires) == 2  # 4 slots - 2 pinned
