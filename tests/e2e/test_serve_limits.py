"""`mer-pipeline serve` at its limits: API keys, chunked prefill, a burst beyond the queue, and SIGTERM.

One small server (2 sequences, a queue of 2, prompts prefilled 4 tokens at a time, an API key): a
request without the key gets 401; a long prompt is prefilled 4 tokens per step while another sequence
keeps decoding, and gets `generate`'s tokens with the same chunks; a burst
of 10 streamed requests gets 503s at once for what does not fit while every accepted request streams
all the tokens it gets alone; SIGTERM while streams are open ends each with an error event, the server
exits 143 and nothing of its run is left (processes, /dev/shm, runtime directory).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from tests.support.pipeline_runs import MER_PIPELINE, run_ids_in_log
from tests.support.serve_runs import ServerRun

pytestmark = pytest.mark.slow  # starts the process graph and an HTTP server

MODEL_ID = "tiny-moe-q8_0"
API_KEY = "sk-test-4b1d"
BURST = 10
PREFILL_CHUNK = 4
KV_POSITIONS = 600
LONG_PROMPT = ("def parse(text):\n    for line in text.splitlines():\n        if line and not line.startswith('#'):\n"
               "            key, value = line.split('=', 1)\n            if key:")  # 40 tokens: 10 chunks
EXIT_SIGTERM = 143
EXIT_SIGINT = 130


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = ServerRun.start(tmp_path_factory.mktemp("serve"), "--max-sequences", 2, "--max-queue", 2,
                          "--api-key", API_KEY, "--compute-workers", 1, "--prefill-chunk", PREFILL_CHUNK,
                          "--kv-positions", KV_POSITIONS)
    try:
        yield run
    finally:
        run.kill()


def client_for(server: ServerRun, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_the_api_key_is_required_on_v1_routes(server):
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "sk-wrong").models.list()
    assert server.get("/v1/models")[0] == 401
    assert server.get("/health")[0] == 200  # probes need no key
    assert server.metrics()["mer_kv_positions"] == KV_POSITIONS  # /metrics needs no key either
    assert [model.id for model in client_for(server).models.list().data] == [MODEL_ID]


def test_a_long_prompt_is_prefilled_in_chunks_while_another_sequence_decodes(server):
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    prompt = tokenizer.encode(LONG_PROMPT)
    assert len(prompt) > 5 * PREFILL_CHUNK
    expected = tokenizer.decode(generate(model, prompt, 16, Sampler(), GGUFExperts(model.source), ignore_eos=True,
                                         prefill_chunk=PREFILL_CHUNK).tokens)
    client = client_for(server)
    steps_before = len(server.events_named("serve_step"))

    def decode() -> None:
        list(client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=80, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))

    background = threading.Thread(target=decode)
    background.start()
    time.sleep(0.5)
    answer = client.completions.create(model=MODEL_ID, prompt=LONG_PROMPT, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    background.join(120)
    assert answer.choices[0].text == expected
    time.sleep(0.5)
    steps = server.events_named("serve_step")[steps_before:]
    assert all(step["prefill_tokens"] <= PREFILL_CHUNK for step in steps)
    shared = [step for step in steps if step["prefill_tokens"] == PREFILL_CHUNK and step["sequences"] == 2]
    assert len(shared) >= 4  # the long prompt's chunks ran next to the other sequence's decode steps


def test_a_burst_beyond_the_limits_gets_503s_and_loses_no_accepted_request(server):
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    expected = tokenizer.decode(generate(model, tokenizer.encode("def "), 48, Sampler(), GGUFExperts(model.source),
                                         ignore_eos=True).tokens)
    client = client_for(server)
    barrier = threading.Barrier(BURST)

    def stream(index: int) -> str | int:
        barrier.wait()
        try:
            chunks = client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=48, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
        except openai.APIStatusError as error:
            assert error.status_code == 503 and error.code == "overloaded"
            return error.status_code
        return "".join(chunk.choices[0].text for chunk in chunks)

    started = time.monotonic()
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(stream, range(BURST)))
    accepted = [result for result in results if isinstance(result, str)]
    print(f"burst of {BURST}: {len(accepted)} accepted, {BURST - len(accepted)} refused, "
          f"{time.monotonic() - started:.1f} s")
    assert 4 <= len(accepted) < BURST  # 2 running + 2 waiting fit
    assert all(text == expected for text in accepted)
    assert server.metrics()["mer_requests_total{endpoint=/v1/completions,status=503}"] == BURST - len(accepted)


def test_sigterm_during_streaming_ends_the_streams_with_an_error_and_leaves_nothing(server):
    client = client_for(server)
    outcomes: list[str] = []
    streaming = threading.Barrier(3)

    def stream() -> None:
        chunks = client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        try:
            for index, _ in enumerate(chunks):
                if index == 2:
                    streaming.wait()
        except openai.APIError as error:
            outcomes.append(str(error))
            return
        outcomes.append("finished")

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    streaming.wait(timeout=60)
    run_ids = server.run_ids()
    assert server.stop(signal.SIGTERM) == EXIT_SIGTERM
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 2 and all("shutting down (SIGTERM)" in outcome for outcome in outcomes), outcomes
    assert run_ids and not server.leftovers(run_ids)
    assert "SIGTERM" in "".join(server.stderr_lines)


def test_up_serve_serves_the_embedded_model_until_sigint(tmp_path, leak_guard):
    run = ServerRun.start(tmp_path, "--max-sequences", 2, command=("up", "--serve"))
    try:
        answer = client_for(run).completions.create(model=MODEL_ID, prompt="def ", max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens <= 4 and answer.choices[0].text
        run_ids = run.run_ids()
        for run_id in run_ids:
            leak_guard.add_run(run_id)
        assert run.stop(signal.SIGINT) == EXIT_SIGINT
        assert run_ids and not run.leftovers(run_ids)
    finally:
        run.kill()


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path, leak_guard):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([MER_PIPELINE, "serve", "--port", str(port), "--log-file", str(tmp_path / "l.jsonl")],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"mer-pipeline serve: error: --host 127.0.0.1 --port {port}")
    assert "cannot listen" in result.stderr and not run_ids_in_log(tmp_path / "l.jsonl")
