"""`mer-pipeline up` with no arguments: the embedded trained model generates a completion through the
real process graph, prints it and the timing line, and exits by itself without a terminal."""

from __future__ import annotations

from mer.cli.up_command import DEMO_GENERATED_TOKENS, EMBEDDED_DEMO_PROMPT
from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from tests.support.generate_runs import run_cli_to_end
from tests.support.pipeline_runs import MER_PIPELINE
import pytest

pytestmark = pytest.mark.slow  # starts the process graph


def test_up_without_arguments_generates_with_the_embedded_model(leak_guard, tmp_path):
    returncode, stdout, stderr = run_cli_to_end(leak_guard, [MER_PIPELINE, "up"], cache_dir=tmp_path / "cache")
    assert returncode == 0, stderr
    assert f"from {tiny_model_path()} after {EMBEDDED_DEMO_PROMPT!r}" in stderr
    assert "decode" in stderr and "tok/s" in stderr and "hit rate" in stderr
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    expected = generate(model, tokenizer.encode(EMBEDDED_DEMO_PROMPT), DEMO_GENERATED_TOKENS, Sampler(),
                        GGUFExperts(model.source), end_ids=tokenizer.end_of_generation_ids).tokens
    assert stdout.rstrip("\n") == tokenizer.decode(expected).rstrip("\n")
