"""`serve` when an expert cannot be used: a read that keeps failing, a NaN in an expert's weights.

The request whose step needed the expert ends with an error naming it (HTTP 500), and the server goes
on: the next request gets the tokens of mer's single-process generation. Real `mer-pipeline serve`
processes over HTTP (`tests/support/serve_runs.py`); after SIGTERM nothing of the run is left (the
server's own check, and the leak guard of `tests/conftest.py`). A hung read: `tests/integration/test_hung_reads.py`.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
from gguf import GGUFReader

from mer.errors import NonFiniteError
from mer.model.experts import GGUFExperts
from mer.model.forward import forward
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from mer.io.slot_load import READ_RETRY_DELAYS_S
from tests.support.corrupt_data import payload_place, write_nan_in_gguf_tensor
from tests.support.serve_runs import ServerRun

pytestmark = pytest.mark.slow  # starts the process graph and an HTTP server

MAX_TOKENS = 8


def first_routed_expert(model: MoEModel, prompt: list[int]) -> tuple[int, int]:
    """(MoE layer, expert) of the first expert the prompt's first token is routed to (in-process forward)."""
    routings = forward(model, prompt, model.new_kv_cache(len(prompt)), GGUFExperts(model.source)).routings
    first_block = min(routings)
    return model.moe_layers[first_block], int(routings[first_block].experts[0][0])


def completion(prompt: str) -> dict:
    return {"model": "served", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def serve_two_requests(tmp_path: Path, first: dict, second: dict, *flags) -> tuple:
    """Start `serve FLAGS`, post `first` then `second`, stop it with SIGTERM: the two (status, body) pairs
    and the `serve_step_failed` events; nothing of the run left."""
    server = ServerRun.start(tmp_path, "--compute-workers", 1, *flags, cache_dir=tmp_path / "cache")
    try:
        (served_model,) = json.loads(server.get("/v1/models")[1])["data"]
        served_name = served_model["id"]
        failed = server.post("/v1/completions", {**first, "model": served_name})
        served = server.post("/v1/completions", {**second, "model": served_name})
        steps_failed = server.events_named("serve_step_failed")
        reads_failed = server.events_named("expert_read_failed")
    finally:
        run_ids = server.run_ids()
        code = server.stop(signal.SIGTERM)
    assert code == 143, "".join(server.stderr_lines)
    assert run_ids and not server.leftovers(run_ids)
    return failed, served, steps_failed, reads_failed


def test_a_read_that_keeps_failing_fails_the_requests_of_its_step_and_the_server_goes_on(tmp_path, monkeypatch):
    """`serve` on the embedded model: every read of the expert the first request's prefill needs first
    fails (EIO) until the retries are spent; that request gets HTTP 500 naming the expert and the file,
    and the next request (the same prompt: the expert is read again, and now succeeds) gets the tokens of
    mer's single-process generation."""
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    prompt = tokenizer.encode("def ")
    moe_layer, expert = first_routed_expert(model, prompt)
    failing_expert = moe_layer * model.hparams.num_experts + expert
    attempts = len(READ_RETRY_DELAYS_S) + 1  # the first read and its retries: all fail, and the load with them
    expected = generate(model, prompt, MAX_TOKENS, Sampler(), GGUFExperts(model.source), ignore_eos=True,
                        end_ids=tokenizer.end_of_generation_ids).tokens
    monkeypatch.setenv("MER_READ_FAULTS", f"{failing_expert}:{attempts}")
    (status, failed), (status_after, served), steps_failed, reads_failed = serve_two_requests(
        tmp_path, completion("def "), completion("def "))
    (read_failed,) = reads_failed
    assert read_failed["expert_id"] == failing_expert, read_failed
    (store,) = (tmp_path / "cache" / "stores").iterdir()  # the store serve converted the model into
    path, offset, _ = payload_place(store, failing_expert)
    assert status == 500, failed
    message = failed["error"]["message"]
    name = f"layer {moe_layer} expert {expert} (id {failing_expert})"
    assert re.search(rf"^the router could not serve the request: {re.escape(name)}: {re.escape(str(path))}: read of "
                     rf"\d+ bytes at offset {offset} failed: \[Errno 5\] Input/output error .*"
                     rf"\(tried {attempts} times over {sum(READ_RETRY_DELAYS_S):g} s\)$", message), message
    (step_failed,) = steps_failed
    assert step_failed["error_type"] == "mer.errors.IoReadError" and len(step_failed["request_ids"]) == 1
    assert status_after == 200, served
    assert served["choices"][0]["text"] == tokenizer.decode(expected)
    assert served["usage"]["completion_tokens"] == MAX_TOKENS


OTHER_PROMPTS = ["class ", "import ", "for i in", "return ", "if x", "while ", "print(", "self.", "x = "]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # the in-process reference
def test_a_nan_in_an_expert_fails_the_requests_of_its_step_naming_layer_and_expert_and_the_server_goes_on(tmp_path):
    """`serve --model` a copy of the embedded model with a NaN block scale in one expert (a bad GGUF: the
    store's checksums match) that the first prompt's prefill needs: that request gets HTTP 500 naming
    the layer and the expert, and a request whose generation never needs it (found in process: its
    single-process generation on the damaged model has finite logits) gets that generation's tokens."""
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    prompt = tokenizer.encode("def ")
    routings = forward(model, prompt, model.new_kv_cache(len(prompt)), GGUFExperts(model.source)).routings
    block = min(routings)
    bos_experts, last_experts = routings[block].experts[0], routings[block].experts[-1]
    expert = int(next(e for e in last_experts if e not in bos_experts))  # one every prompt's BOS does not need
    damaged = tmp_path / "damaged.gguf"
    shutil.copyfile(tiny_model_path(), damaged)
    (gate,) = [tensor for tensor in GGUFReader(damaged).tensors if tensor.name == f"blk.{block}.ffn_gate_exps.weight"]
    write_nan_in_gguf_tensor(damaged, gate.name, expert * (int(gate.n_bytes) // model.hparams.num_experts))
    damaged_model = MoEModel.load(damaged)
    with pytest.raises(NonFiniteError):  # the damage reaches "def "'s logits in one process
        generate(damaged_model, prompt, MAX_TOKENS, Sampler(), GGUFExperts(damaged_model.source), ignore_eos=True)
    other, expected = next((text, tokens) for text in OTHER_PROMPTS
                           if (tokens := finite_generation(damaged_model, tokenizer, text)) is not None)
    (status, failed), (status_after, served), steps_failed, _ = serve_two_requests(
        tmp_path, completion("def "), completion(other), "--model", damaged)
    moe_layer = model.moe_layers[block]
    (store,) = (tmp_path / "cache" / "stores").iterdir()  # the store serve converted the model into
    path, offset, _ = payload_place(store, moe_layer * model.hparams.num_experts + expert)
    assert status == 500, failed
    message = failed["error"]["message"]
    name = f"layer {moe_layer} expert {expert} (id {moe_layer * model.hparams.num_experts + expert})"
    assert message.startswith(f"the router could not serve the request: {name}: its output holds NaN or inf "
                              f"(its payload in {path} at offset {offset} "), message
    (step_failed,) = steps_failed
    assert step_failed["error_type"] == "mer.errors.NonFiniteError" and len(step_failed["request_ids"]) == 1
    assert status_after == 200, served
    assert served["choices"][0]["text"] == tokenizer.decode(expected)
    assert served["usage"]["completion_tokens"] == MAX_TOKENS


def finite_generation(model: MoEModel, tokenizer, text: str) -> list[int] | None:
    """The single-process greedy tokens of `text`, or None if its logits hold NaN or inf."""
    try:
        return generate(model, tokenizer.encode(text), MAX_TOKENS, Sampler(), GGUFExperts(model.source),
                        ignore_eos=True, end_ids=tokenizer.end_of_generation_ids).tokens
    except NonFiniteError:
        return None
