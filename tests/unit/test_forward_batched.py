"""Several sequences in one forward pass (`ForwardPass.step`): each gets the logits it gets alone, bit for bit.

The serving job's continuous batching steps the sequences together, a newcomer's whole prompt next to
the others' decode tokens; greedy serving equals `generate` only if nothing leaks between them.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.model.experts import GGUFExperts
from mer.model.forward import ForwardPass, Segment, in_process, run_inline
from mer.model.model import MoEModel
from tests.support.gguf_models import write_tiny_moe_gguf

PROMPTS = {"a": [3, 77, 301, 150, 9], "b": [250, 42], "c": [17, 266, 100, 5, 380, 64, 128, 7, 99]}
JOINS = {"a": 0, "b": 1, "c": 3}  # the step at which each sequence's prompt joins the batch
STEPS = 8


def alone(forward_pass: ForwardPass, model: MoEModel, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits of one sequence run by itself (generate's order)."""
    cache = model.new_kv_cache(64)
    logits = [run_inline(forward_pass(prompt, cache, all_logits=False)).logits[-1]]
    tokens = [int(np.argmax(logits[-1]))]
    while len(tokens) < STEPS:
        logits.append(run_inline(forward_pass([tokens[-1]], cache, all_logits=False)).logits[-1])
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits


def together(forward_pass: ForwardPass, model: MoEModel) -> dict[str, list[np.ndarray]]:
    """The same sequences stepped together, each joining at its step: logits per sequence."""
    caches = {name: model.new_kv_cache(64) for name in PROMPTS}
    pending: dict[str, list[int]] = {}
    logits: dict[str, list[np.ndarray]] = {name: [] for name in PROMPTS}
    for step in range(JOINS["c"] + STEPS):
        pending.update({name: PROMPTS[name] for name, join in JOINS.items() if join == step})
        running = [name for name in PROMPTS if name in pending and len(logits[name]) < STEPS]
        if not running:
            break
        result = run_inline(forward_pass.step([Segment(pending[name], caches[name]) for name in running], clock=step))
        assert result.logits.shape[0] == len(running)
        for name, row in zip(running, result.logits):
            logits[name].append(row)
            pending[name] = [int(np.argmax(row))]
    return logits


@pytest.mark.parametrize("arch,dtype", [("llama", "q8_0"), ("llama", "q4_0"), ("qwen3moe", "f16"), ("olmoe", "q8_0")])
def test_sequences_stepped_together_get_their_logits_alone(tmp_path, arch, dtype):
    info = write_tiny_moe_gguf(tmp_path / f"{arch}.gguf", arch=arch, dtypes=(dtype,) * 3, dense_dtype=dtype,
                               n_experts=8, top_k=2, d_model=64, d_ff=128, n_heads=4,
                               n_kv_heads=4 if arch == "olmoe" else 2, vocab_size=384, seed=11)
    model = MoEModel.load(info.path)
    forward_pass = ForwardPass(model, in_process(GGUFExperts(model.source)))
    batched = together(forward_pass, model)
    for name, prompt in PROMPTS.items():
        tokens, logits = alone(forward_pass, model, prompt)
        assert len(batched[name]) == STEPS
        for step, (mine, theirs) in enumerate(zip(batched[name], logits)):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"sequence {name}, step {step}")
        assert [int(np.argmax(row)) for row in batched[name]] == tokens


def test_one_segment_is_the_plain_pass(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "m.gguf", arch="llama", dtypes=("q8_0",) * 3, dense_dtype="q8_0",
                               n_experts=8, top_k=2, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2,
                               vocab_size=384, seed=5)
    model = MoEModel.load(info.path)
    forward_pass = ForwardPass(model, in_process(GGUFExperts(model.source)))
    plain = run_inline(forward_pass(PROMPTS["c"], model.new_kv_cache(64)))
    stepped = run_inline(forward_pass.step([Segment(PROMPTS["c"], model.new_kv_cache(64))], all_logits=True))
    np.testing.assert_array_equal(plain.logits, stepped.logits)
    assert plain.logits.shape == (len(PROMPTS["c"]), 384)


@pytest.mark.parametrize("style", ["v2-lite", "v3", "glm4moe"])
def test_mla_sequences_stepped_together_get_their_logits_alone(tmp_path, style):
    """deepseek2: each sequence's compressed KV cache and grouped routing stay its own in a shared pass;
    glm4moe: its partially rotated keys, optional q/k norms and sigmoid routing likewise."""
    from tests.support.deepseek2_models import write_tiny_deepseek2_gguf
    from tests.support.glm4moe_models import write_tiny_glm4moe_gguf

    path = tmp_path / f"{style}.gguf"
    model = MoEModel.load((write_tiny_glm4moe_gguf(path, dense_dtype="q8_0", seed=1) if style == "glm4moe" else
                           write_tiny_deepseek2_gguf(path, style=style, dense_dtype="q8_0", seed=1)).path)
    forward_pass = ForwardPass(model, in_process(GGUFExperts(model.source)))
    batched = together(forward_pass, model)
    for name, prompt in PROMPTS.items():
        tokens, logits = alone(forward_pass, model, prompt)
        for step, (mine, theirs) in enumerate(zip(batched[name], logits)):
            np.testing.assert_array_equal(mine, theirs, err_msg=f"sequence {name}, step {step}")
        assert [int(np.argmax(row)) for row in batched[name]] == tokens
