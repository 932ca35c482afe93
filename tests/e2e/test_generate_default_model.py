"""`mer-pipeline generate` without `--model` runs the tiny model shipped in `mer/models` through the
process graph: the same greedy tokens as mer's single-process generation of that GGUF."""

from __future__ import annotations

import json

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from tests.support.generate_runs import run_cli_to_end
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE
import pytest

pytestmark = pytest.mark.slow  # starts the process graph

PROMPT = "def "
STEPS = 24


def test_generate_uses_the_shipped_tiny_model_when_no_model_is_given(leak_guard, tmp_path):
    log_path = tmp_path / "generate.jsonl"
    argv = [MER_PIPELINE, "generate", "--prompt", PROMPT, "-n", str(STEPS), "--ignore-eos", "--json",
            "--log-file", str(log_path), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    returncode, stdout, stderr = run_cli_to_end(leak_guard, argv, cache_dir=tmp_path / "cache", log_path=log_path)
    assert returncode == 0, stderr
    assert f"converting {tiny_model_path()}" in stderr
    result = json.loads(stdout)
    model = MoEModel.load(tiny_model_path())
    prompt = load_tokenizer(model.source.parts[0]).encode(PROMPT)
    expected = generate(model, prompt, STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True).tokens
    assert result["prompt_tokens"] == prompt
    assert result["tokens"] == expected
    assert result["text"] == load_tokenizer(model.source.parts[0]).decode(expected)
