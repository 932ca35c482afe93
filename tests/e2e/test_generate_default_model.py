"""`mer-pipeline generate` without `--model` runs the tiny model shipped in `mer/models` through the
process graph: the same greedy tokens as mer's single-process generation of that GGUF."""

from __future__ import annotations

import json
import os
import subprocess

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from tests.generate_runs import GENERATE_TIMEOUT_S
from tests.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE, run_ids_in_log

PROMPT = "def "
STEPS = 24


def test_generate_uses_the_shipped_tiny_model_when_no_model_is_given(leak_guard, tmp_path):
    log_path = tmp_path / "generate.jsonl"
    argv = [MER_PIPELINE, "generate", "--prompt", PROMPT, "-n", str(STEPS), "--ignore-eos", "--json",
            "--log-file", str(log_path), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")})
    leak_guard.add_supervisor_pid(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=GENERATE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for run_id in run_ids_in_log(log_path):
            leak_guard.add_run(run_id)
    assert process.returncode == 0, stderr
    assert f"converting {tiny_model_path()}" in stderr
    result = json.loads(stdout)
    model = MoEModel.load(tiny_model_path())
    prompt = load_tokenizer(model.source.parts[0]).encode(PROMPT)
    expected = generate(model, prompt, STEPS, Sampler(), GGUFExperts(model.source), ignore_eos=True).tokens
    assert result["prompt_tokens"] == prompt
    assert result["tokens"] == expected
    assert result["text"] == load_tokenizer(model.source.parts[0]).decode(expected)
