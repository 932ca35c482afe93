"""llama.cpp (llama-cpp-python) as the parity oracle, run the way MEASUREMENTS.md says is exact.

- `use_extra_bufts = False` on the model parameters: otherwise llama.cpp moves q4_0/q8_0 weights
  to its AMX / repacked buffers and, on CPUs that advertise AMX here, dies with SIGILL. `Llama()`
  has no keyword for it, so the default model parameters are patched while it loads.
- f32 K and V caches (the default f16 cache costs ~3-5e-4 relative), flash attention off,
  one thread, logits for every position.
- tokens are fed with `Llama.eval`, which adds no BOS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def open_llama(path: str | Path, n_ctx: int = 256):  # type: ignore[no-untyped-def]
    """A llama_cpp.Llama for `path` set up for exact comparisons (see the module docstring)."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():  # type: ignore[no-untyped-def]
        params = original()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1, n_threads_batch=1,
            logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
            verbose=False,
        )
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def llama_greedy(llm, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:  # type: ignore[no-untyped-def]
    """Greedy continuation of `prompt` by llama.cpp (argmax of its logits, no sampler): the
    tokens and the logits `[steps, vocab]` each was chosen from."""
    llm.reset()
    llm.eval(prompt)
    tokens, logits = [], []
    for _ in range(steps):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        logits.append(row)
        tokens.append(int(np.argmax(row)))
        llm.eval([tokens[-1]])
    return tokens, np.stack(logits)


def assert_tokenizer_matches(llm, tokenizer, texts) -> None:  # type: ignore[no-untyped-def]
    """mer's `tokenizer` gives llama.cpp's ids for each text (with and without BOS, special tokens parsed
    or not), and its token bytes are llama.cpp's."""
    for text in texts:
        for add_special, parse_special in ((True, False), (False, False), (True, True)):
            expected = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
            assert tokenizer.encode(text, add_special, parse_special) == expected, (text, add_special, parse_special)
        ids = tokenizer.encode(text, add_special=False)
        assert b"".join(tokenizer.token_bytes(token) for token in ids) == b"".join(
            llm.detokenize([token]) for token in ids), text


def assert_greedy_matches_llama(llm, model, text: str, steps: int, n_experts: int, max_relative: float,  # type: ignore[no-untyped-def]
                                median_relative: float, label: str):
    """mer's single-process greedy continuation of `text` (llama.cpp's tokens, BOS as the file says) is
    llama.cpp's for `steps` tokens, each step's logits within (largest difference / largest llama.cpp
    logit) `max_relative`, the median step within `median_relative`; the continuation is not degenerate
    (8+ distinct tokens) and routes to 8+ of the `n_experts` experts. Returns mer's result."""
    from mer.model.experts import GGUFExperts
    from mer.model.generate import generate
    from mer.model.sampling import Sampler

    prompt = llm.tokenize(text.encode(), add_bos=True, special=False)
    theirs_tokens, theirs = llama_greedy(llm, prompt, steps)
    result = generate(model, prompt, steps, Sampler(), GGUFExperts(model.source), ignore_eos=True, keep_logits=True)
    differing = [step for step, (a, b) in enumerate(zip(result.tokens, theirs_tokens)) if a != b]
    assert not differing, f"greedy tokens differ from llama.cpp first at step {differing[0]}"
    errors = np.abs(np.stack(result.step_logits) - theirs).max(axis=1) / np.abs(theirs).max(axis=1)
    print(f"{label}: {steps} tokens identical ({len(set(result.tokens))} distinct), relative logit error "
          f"max {errors.max():.2e}, median {np.median(errors):.2e}")
    assert errors.max() <= max_relative and np.median(errors) <= median_relative
    assert len(set(result.tokens)) >= 8, "a degenerate continuation is a weak comparison"
    counts = np.bincount(np.concatenate([routing[2].experts.ravel() for routing in result.routings]),
                         minlength=n_experts)
    assert (counts > 0).sum() >= 8, counts.tolist()
    return result
