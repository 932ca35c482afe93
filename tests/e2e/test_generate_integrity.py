"""Integrity of `mer-pipeline generate`: a corrupt cached store, a NaN in a GGUF's expert or LM head.

Each test writes a tiny q8_0 model with the `gguf` library, damages it (or the store `generate`
converts from it into the test's cache) and runs the real CLI: exit 1, nothing on stdout, one line
naming the expert (layer, index), the file and the offset, or 'logits' (a store file truncated while
it runs: the expert and the file, after the read was retried); and (the leak guard of
`tests/conftest.py`) no process, /dev/shm segment or runtime directory left.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.model import MoEModel
from mer.store.demo import converted_store
from mer.store.manifest import Manifest
from tests.support.corrupt_data import flip_byte, payload_place, write_nan_f32_in_gguf_tensor, write_nan_in_gguf_tensor
from tests.support.generate_runs import generate_argv, run_generate
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import RunningPipeline

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT_TOKENS = [17, 200, 5, 33, 99]
Q8_0_BLOCK_NBYTES, Q8_0_BLOCK_SIZE = 34, 32


def write_model(path: Path):
    return write_tiny_moe_gguf(path, arch="llama", dtypes=("q8_0",) * 3, n_layers=2, n_experts=8, top_k=2, d_model=64,
                               d_ff=128, vocab_size=384, seed=4)


def routed_expert(model_path: Path) -> int:
    """An expert of the first MoE block that the prompt's first token is routed to (in-process forward)."""
    model = MoEModel.load(model_path)
    result = forward(model, PROMPT_TOKENS, model.new_kv_cache(len(PROMPT_TOKENS)), GGUFExperts(model.source))
    return int(result.routings[0].experts[0][0])  # block 0 is MoE layer 0


def generate(leak_guard, model: Path, tmp_path: Path, cache_dir: Path):
    return run_generate(leak_guard, model, "--prompt-tokens", ",".join(map(str, PROMPT_TOKENS)), "-n", 4,
                        "--compute-workers", 1, workdir=tmp_path, cache_dir=cache_dir)


def error_line(run) -> str:
    assert run.returncode == 1, run.stderr
    assert run.stdout == "" and "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("mer-pipeline generate: error: "), line
    return line


def test_a_flipped_byte_in_the_cached_store_fails_naming_expert_file_and_offset(leak_guard, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    info = write_model(tmp_path / "model.gguf")
    monkeypatch.setenv("MER_CACHE_DIR", str(cache_dir))
    store = converted_store(info.path)  # where generate finds it again, by the GGUF's fingerprint
    expert = routed_expert(info.path)
    path, offset = flip_byte(store, expert)
    line = error_line(generate(leak_guard, info.path, tmp_path, cache_dir))
    assert (f"PayloadChecksumError: layer 0 expert {expert} (id {expert}): checksum mismatch in {path} "
            f"at offset {offset} ") in line, line


def test_a_nan_scale_in_an_expert_of_the_gguf_fails_naming_layer_and_expert(leak_guard, tmp_path):
    info = write_model(tmp_path / "model.gguf")
    expert = routed_expert(info.path)
    expert_nbytes = info.d_ff * (info.d_model // Q8_0_BLOCK_SIZE) * Q8_0_BLOCK_NBYTES
    write_nan_in_gguf_tensor(info.path, "blk.0.ffn_gate_exps.weight", expert * expert_nbytes)  # its first block's scale
    cache_dir = tmp_path / "cache"
    run = generate(leak_guard, info.path, tmp_path, cache_dir)
    line = error_line(run)
    (store,) = (cache_dir / "stores").iterdir()
    path, offset, _ = payload_place(store, expert)
    assert (f"NonFiniteError: layer 0 expert {expert} (id {expert}): its output holds NaN or inf "
            f"(its payload in {path} at offset {offset} ") in line, line


def test_a_nan_in_the_lm_head_fails_naming_the_logits(leak_guard, tmp_path):
    info = write_model(tmp_path / "model.gguf")
    write_nan_f32_in_gguf_tensor(info.path, "output.weight")
    line = error_line(generate(leak_guard, info.path, tmp_path, tmp_path / "cache"))
    assert f"NonFiniteError: logits: NaN or inf at position {len(PROMPT_TOKENS) - 1} " in line, line


def test_a_store_file_truncated_mid_generation_fails_naming_expert_and_file(leak_guard, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    info = write_model(tmp_path / "model.gguf")
    monkeypatch.setenv("MER_CACHE_DIR", str(cache_dir))
    store = converted_store(info.path)
    layer_file = store / Manifest.load(store).layers[1].file
    argv = generate_argv(info.path, "--prompt-tokens", ",".join(map(str, PROMPT_TOKENS)), "-n", 200, "--ignore-eos",
                         "--cache-slots", 2, "--compute-workers", 1, log_path=tmp_path / "generate.jsonl")
    run = RunningPipeline.command(leak_guard, argv, tmp_path / "generate.jsonl")
    try:
        run.wait_for_event("generation_token", count=2)
        os.truncate(layer_file, 4096)  # the second MoE layer's experts are gone while it runs
        result = run.finish()
    finally:
        run.kill_if_running()
    line = error_line(result)
    assert re.search(rf"IoReadError: layer 1 expert \d+ \(id \d+\): {re.escape(str(layer_file))}: read of \d+ bytes at "
                     r"offset \d+ came back short.* \(tried 4 times over 0\.31 s\)$", line), line
