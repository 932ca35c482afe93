"""The single-process generation loop: stopping rules, determinism, and the greedy/forward agreement."""

from __future__ import annotations

import numpy as np
import pytest

from mer.errors import ConfigError, ContextLengthError
from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.generate import STOP_CONTEXT, STOP_END_OF_GENERATION, STOP_MAX_TOKENS, generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from tests.support.gguf_models import write_tiny_moe_gguf

PROMPT = [1, 40, 300, 12, 77]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    info = write_tiny_moe_gguf(tmp_path_factory.mktemp("gen") / "m.gguf", arch="qwen3moe", dtypes=("q4_0",) * 3,
                               dense_dtype="q8_0", n_experts=8, vocab_size=384, context_length=24, seed=4)
    return MoEModel.load(info.path)


def test_greedy_tokens_are_the_argmax_of_a_full_forward(model):
    experts = GGUFExperts(model.source)
    result = generate(model, PROMPT, 8, Sampler(), experts, keep_logits=True)
    assert result.stop_reason == STOP_MAX_TOKENS and len(result.tokens) == 8 and result.prompt_tokens == PROMPT
    logits = forward(model, PROMPT + result.tokens[:-1], model.new_kv_cache(24), experts).logits
    assert result.tokens == np.argmax(logits[len(PROMPT) - 1 :], axis=1).tolist()
    assert np.allclose(np.stack(result.step_logits), logits[len(PROMPT) - 1 :], rtol=0, atol=1e-4)
    assert len(result.routings) == 8 and sorted(result.routings[0]) == [0, 1]
    assert result.routings[0][0].num_tokens == len(PROMPT) and result.routings[1][0].num_tokens == 1


def test_stops_on_end_of_generation_unless_ignored(model):
    experts = GGUFExperts(model.source)
    free = generate(model, PROMPT, 6, Sampler(), experts)
    end = free.tokens[2]
    stopped = generate(model, PROMPT, 6, Sampler(), experts, end_ids={end})
    first = free.tokens.index(end)
    assert stopped.stop_reason == STOP_END_OF_GENERATION and stopped.tokens == free.tokens[: first + 1]
    ignored = generate(model, PROMPT, 6, Sampler(), experts, end_ids={end}, ignore_eos=True)
    assert ignored.tokens == free.tokens and ignored.stop_reason == STOP_MAX_TOKENS


def test_sampled_generation_is_reproducible_per_seed(model):
    experts = GGUFExperts(model.source)
    runs = [generate(model, PROMPT, 10, Sampler(temperature=1.2, top_k=20, top_p=0.95, seed=seed), experts).tokens
            for seed in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_context_limits(model):
    experts = GGUFExperts(model.source)
    streamed: list[int] = []
    full = generate(model, PROMPT, 100, Sampler(), experts, on_token=streamed.append)
    assert full.stop_reason == STOP_CONTEXT and len(PROMPT) + len(full.tokens) == 25 and streamed == full.tokens
    with pytest.raises(ContextLengthError, match="the prompt has 25 tokens, the model's context is 24"):
        generate(model, [1] * 25, 1, Sampler(), experts)
    with pytest.raises(ContextLengthError, match="the prompt is empty"):
        generate(model, [], 1, Sampler(), experts)
    with pytest.raises(ConfigError, match="max_tokens must be an integer >= 0"):
        generate(model, PROMPT, -1, Sampler(), experts)
