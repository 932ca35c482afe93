"""`mer-pipeline perplexity` refuses bad input before anything starts: one line on stderr naming the
file, flag or value, the documented exit status (1, or 2 for a bad flag), nothing on stdout, no
store converted, nothing left behind (the leak guard). What llama-perplexity refuses (a text of fewer
than 2 x ctx tokens) is refused, and so is what mer cannot run (a context above the model's).

The one test that starts the graph (marked slow) checks the human output: llama-perplexity's lines on
stdout (`[1]...,[2]...,` running values and `Final estimate: PPL = ... +/- ...`), equal to the `--json`
run's values, and the progress on stderr; and that `logs summarize` recomputes those values from the
run's log, or from the chunks an interrupted run scored (with a warning).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from tests.support.generate_runs import run_cli_to_end
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE

CLI_TIMEOUT_S = 60


def perplexity(tmp_path, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([MER_PIPELINE, "perplexity", *map(str, argv)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env={**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")})


def assert_refused(result: subprocess.CompletedProcess, status: int, message: str, tmp_path) -> None:
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mer-pipeline perplexity: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "cache").exists()  # refused before the conversion


@pytest.fixture
def model(tmp_path):
    return write_tiny_moe_gguf(tmp_path / "tiny.gguf", n_layers=2, n_experts=4, d_model=64, d_ff=128,
                               vocab_size=320, context_length=128).path


def test_a_missing_text_file_is_named(tmp_path, model):
    result = perplexity(tmp_path, "--model", model, "--file", tmp_path / "absent.txt")
    assert_refused(result, 1, f"--file {tmp_path / 'absent.txt'}: no such file", tmp_path)


def test_a_directory_is_not_a_text(tmp_path, model):
    assert_refused(perplexity(tmp_path, "--model", model, "--file", tmp_path), 1, "is a directory", tmp_path)


def test_an_empty_text_is_refused(tmp_path, model):
    (tmp_path / "empty.txt").write_text("")
    result = perplexity(tmp_path, "--model", model, "--file", tmp_path / "empty.txt")
    assert_refused(result, 1, "empty.txt: the file is empty", tmp_path)


def test_a_text_that_is_not_utf8_is_refused_naming_the_byte(tmp_path, model):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    result = perplexity(tmp_path, "--model", model, "--file", tmp_path / "latin1.txt")
    assert_refused(result, 1, "latin1.txt: not UTF-8 text (byte 3: invalid continuation byte)", tmp_path)


def test_a_text_shorter_than_two_contexts_is_refused_as_llama_perplexity_refuses_it(tmp_path, model):
    (tmp_path / "short.txt").write_text("the router picks two experts")
    result = perplexity(tmp_path, "--model", model, "--file", tmp_path / "short.txt", "--ctx", "64")
    assert_refused(result, 1, "perplexity with a context of 64 needs at least 128 (2 x --ctx)", tmp_path)
    assert "short.txt tokenizes to " in result.stderr


def test_a_context_larger_than_the_models_is_refused(tmp_path, model):
    (tmp_path / "long.txt").write_text("the router picks two experts for every token " * 200)
    result = perplexity(tmp_path, "--model", model, "--file", tmp_path / "long.txt", "--ctx", "512")
    assert_refused(result, 1, "--ctx 512 is larger than the model's context of 128 tokens", tmp_path)


def test_a_context_too_small_to_score_a_token_is_refused(tmp_path, model):
    (tmp_path / "long.txt").write_text("the router picks two experts for every token " * 20)
    result = perplexity(tmp_path, "--model", model, "--file", tmp_path / "long.txt", "--ctx", "3")
    assert_refused(result, 1, "--ctx 3: a perplexity chunk needs at least 4 tokens", tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--chunks", "0"], "argument --chunks: '0' is not a positive integer"),
    (["--ctx", "x"], "argument --ctx: 'x' is not an integer"),
])
def test_bad_flag_values_are_usage_errors(tmp_path, argv, message):
    assert_refused(perplexity(tmp_path, *argv), 2, message, tmp_path)


def test_a_model_without_a_text_is_a_usage_error(tmp_path, model):
    assert_refused(perplexity(tmp_path, "--model", model), 2,
                   "--file TEXT is needed with --model", tmp_path)


def test_a_vocabulary_that_appends_eos_is_refused(tmp_path):
    path = write_tiny_moe_gguf(tmp_path / "eos.gguf", n_layers=2, n_experts=4, d_model=64, d_ff=128,
                               vocab_size=320).path
    rewritten = tmp_path / "eos-appended.gguf"
    _copy_with_add_eos(path, rewritten)
    (tmp_path / "long.txt").write_text("the router picks two experts for every token " * 20)
    result = perplexity(tmp_path, "--model", rewritten, "--file", tmp_path / "long.txt", "--ctx", "16")
    assert_refused(result, 1, "tokenizer.ggml.add_eos_token is true", tmp_path)


def _copy_with_add_eos(source, target) -> None:
    """`source` with `tokenizer.ggml.add_eos_token = true` added (every other key and tensor as they are)."""
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
    writer.add_bool("tokenizer.ggml.add_eos_token", True)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow  # starts the process graph
def test_the_human_output_is_llama_perplexitys_lines_with_the_json_runs_values(leak_guard, tmp_path, model):
    (tmp_path / "text.txt").write_text("the router picks two experts for every token in every layer. " * 30)
    common = [MER_PIPELINE, "perplexity", "--model", str(model), "--file", str(tmp_path / "text.txt"), "--ctx", "32",
              "--chunks", "3", "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    status, text, stderr = run_cli_to_end(leak_guard, [*common, "--log-file", str(tmp_path / "a.jsonl")],
                                          cache_dir=tmp_path / "cache", log_path=tmp_path / "a.jsonl")
    assert status == 0, stderr
    status, as_json, _ = run_cli_to_end(leak_guard, [*common, "--json", "--log-file", str(tmp_path / "b.jsonl")],
                                        cache_dir=tmp_path / "cache", log_path=tmp_path / "b.jsonl")
    result = json.loads(as_json)
    running = ",".join(f"[{index + 1}]{value:.4f}" for index, value in enumerate(result["running_ppl"])) + ","
    assert text.splitlines() == [running, f"Final estimate: PPL = {result['ppl']:.4f} +/- {result['ppl_error']:.5f}"]
    assert [line for line in stderr.splitlines() if "[3/3]" in line][0].startswith(
        f"mer-pipeline perplexity: [3/3] {result['ppl']:.4f} (this chunk {result['chunk_ppl'][2]:.4f}")
    # `logs summarize` recomputes the values from the chunks' events, and says when the run did not finish
    summarized = subprocess.run([MER_PIPELINE, "logs", "summarize", str(tmp_path / "b.jsonl"), "--json"],
                                capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert summarized.returncode == 0 and summarized.stderr == "", summarized.stderr
    recomputed = json.loads(summarized.stdout)
    assert recomputed["kind"] == "perplexity" and recomputed["chunks"] == 3
    assert recomputed["ppl"] == pytest.approx(result["ppl"], rel=1e-12)
    assert recomputed["ppl_error"] == pytest.approx(result["ppl_error"], rel=1e-12)
    assert recomputed["running_ppl"] == pytest.approx(result["running_ppl"], rel=1e-12)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    chunk_events = [index for index, line in enumerate(lines) if '"perplexity_chunk_done"' in line]
    cut = tmp_path / "interrupted.jsonl"
    cut.write_text("\n".join(lines[: chunk_events[1] + 1]) + "\n")  # two chunks scored, then nothing
    partial = subprocess.run([MER_PIPELINE, "logs", "summarize", str(cut)], capture_output=True, text=True,
                             timeout=CLI_TIMEOUT_S)
    assert partial.returncode == 0, partial.stderr
    assert "the run did not finish (interrupted or failed); its values are those of the 2 of 3 chunks" in partial.stderr
    kind, what, running = partial.stdout.splitlines()[:3]
    assert kind == "log kind: perplexity (a perplexity run (mer-pipeline perplexity))"
    assert what.startswith(f"perplexity of {model}: 2 of 3 chunks of 32 tokens, 30 scored, in ")
    assert running == ",".join(f"[{index + 1}]{value:.4f}" for index, value in enumerate(result["running_ppl"][:2])) + ","
