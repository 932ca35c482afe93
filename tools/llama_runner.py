#!/usr/bin/env python3
"""llama.cpp's side of `tools/bench_beyond_ram.py`: load a GGUF, prefill a prompt, decode N tokens.

llama-cpp-python with the model memory-mapped (llama.cpp's default), `--threads` threads for both
prefill and decode, and its extra CPU buffer types off (`use_extra_bufts = False`: the repacked /
AMX buffers die with SIGILL on this CPU; `Llama()` has no keyword for it, so the default model
parameters are patched while it loads, as tests/support/llama_reference.py does). Tokens are fed
with `Llama.eval` as given (no BOS) and sampled here from the last position's logits (temperature
as mer's `--temperature`, seeded), exactly as mer's generation loop counts them: the first token
comes from the prefill's logits, then `max_tokens - 1` decode passes.

With `--handshake` it prints one JSON line `{"loaded": ..., "rss_anon_bytes": ...}` once the model
and context are ready and waits for a line on stdin before the prefill (the benchmark sets the
memory limit in between). The result is one JSON line on stdout; times are `time.monotonic()`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def open_model(path: str, n_ctx: int, n_batch: int, threads: int):  # type: ignore[no-untyped-def]
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():  # type: ignore[no-untyped-def]
        params = original()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                               n_threads_batch=threads, use_mmap=True, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def last_logits(llm) -> np.ndarray:  # type: ignore[no-untyped-def]
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / temperature
    weights = np.exp(scaled)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-tokens", required=True, help="comma-separated token ids")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--handshake", action="store_true")
    args = parser.parse_args()
    prompt = [int(token) for token in args.prompt_tokens.split(",") if token]
    n_ctx = len(prompt) + args.max_tokens + 8
    t_load = time.monotonic()
    llm = open_model(args.model, n_ctx, min(512, max(len(prompt), 32)), args.threads)
    t_loaded = time.monotonic()
    if args.handshake:
        print(json.dumps({"loaded": True, "rss_anon_bytes": rss_anon_bytes()}), flush=True)
        sys.stdin.readline()
    rng = np.random.default_rng(args.seed)
    t_prefill = time.monotonic()
    llm.eval(prompt)
    tokens = [sample(last_logits(llm), args.temperature, rng)]
    t_decode = time.monotonic()
    prefill_s = t_decode - t_prefill
    steps = 0
    while len(tokens) < args.max_tokens:
        llm.eval([tokens[-1]])
        tokens.append(sample(last_logits(llm), args.temperature, rng))
        steps += 1
    t_end = time.monotonic()
    decode_s = t_end - t_decode
    print(json.dumps({
        "tokens": tokens, "prompt_tokens": len(prompt), "load_s": t_loaded - t_load, "prefill_s": prefill_s,
        "decode_s": decode_s, "decode_steps": steps, "prefill_tps": len(prompt) / prefill_s,
        "decode_tps": steps / decode_s if steps else 0.0, "t_load": t_load, "t_prefill": t_prefill,
        "t_decode": t_decode, "t_end": t_end, "rss_anon_bytes": rss_anon_bytes(), "threads": args.threads,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
