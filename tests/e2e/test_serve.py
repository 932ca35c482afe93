"""`mer-pipeline serve` end to end: a real server on the embedded model, driven by the official `openai` client.

One server (8 sequences, a queue of 16) serves the whole module: completions and chat, streamed and
not, greedy text equal to `mer-pipeline generate`'s, 16 concurrent streams that each get the tokens
they get alone, a decode step of 4 sequences that looks up each of its experts once, a client that
disconnects, and `/metrics` parsed with prometheus_client's parser and checked against the log. The
server is stopped with SIGTERM at the end and nothing of its run may be left behind.
"""

from __future__ import annotations

import json
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
from mer.serve.chat_prompt import fallback_chat_text
from tests.support.embedded_model import embedded_geometry
from tests.support.generate_runs import run_cli_to_end
from tests.support.pipeline_runs import HANDSHAKE_TIMEOUT_S, MER_PIPELINE
from tests.support.serve_runs import ServerRun

pytestmark = pytest.mark.slow  # starts the process graph and an HTTP server

MODEL_ID = "tiny-moe-q8_0"
PROMPTS = ["def ", "class ", "import ", "for i in", "return ", "if x", "while ", "print(", "self.", "x = ", "try:",
           "with open(", "from os", "lambda ", "yield ", "assert "]
EXIT_SIGTERM = 143


@pytest.fixture(scope="module")
def reference():
    """Greedy generation alone, in one process (the graph's `generate` gives the same: test_generate_default_model)."""
    model = MoEModel.load(tiny_model_path())
    tokenizer = load_tokenizer(model.source.parts[0])
    experts = GGUFExperts(model.source)

    def alone(prompt_text: str, max_tokens: int, ignore_eos: bool = True) -> tuple[list[int], str]:
        prompt = tokenizer.encode(prompt_text)
        tokens = generate(model, prompt, max_tokens, Sampler(), experts, ignore_eos=ignore_eos,
                          end_ids=tokenizer.end_of_generation_ids).tokens
        return tokens, tokenizer.decode(tokens)

    return alone


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    run = ServerRun.start(workdir, "--max-sequences", 8, "--max-queue", 16, "--compute-workers", 2)
    try:
        yield run
    finally:
        run_ids = run.run_ids()
        code = run.stop(signal.SIGTERM)
        assert code == EXIT_SIGTERM, "".join(run.stderr_lines)
        assert run_ids and not run.leftovers(run_ids)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def wait_idle(server: ServerRun, timeout_s: float = 20.0) -> dict[str, float]:
    """The metrics once nothing is in flight and the router's last step reported no sequence."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = server.metrics()
        if samples["mer_requests_in_flight"] == 0 and samples["mer_active_sequences"] == 0:
            return samples
        assert time.monotonic() < deadline, f"still busy after {timeout_s} s: {samples}"
        time.sleep(0.1)


def test_models_and_health(server, client):
    assert server.get("/health") == (200, json.dumps({"status": "ok"}, separators=(",", ":")))
    assert [model.id for model in client.models.list().data] == [MODEL_ID]


def test_greedy_completion_equals_generate(server, client, reference, tmp_path, leak_guard):
    argv = [MER_PIPELINE, "generate", "--prompt", "def ", "-n", "24", "--json", "--log-file",
            str(tmp_path / "generate.jsonl"), "--handshake-timeout-s", str(HANDSHAKE_TIMEOUT_S)]
    returncode, stdout, stderr = run_cli_to_end(leak_guard, argv, cache_dir=tmp_path / "cache",
                                                log_path=tmp_path / "generate.jsonl")
    assert returncode == 0, stderr
    generated = json.loads(stdout)
    completion = client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=24, temperature=0)
    assert completion.choices[0].text == generated["text"]
    assert completion.usage.prompt_tokens == len(generated["prompt_tokens"])
    assert completion.usage.completion_tokens == len(generated["tokens"])
    assert completion.choices[0].finish_reason == ("stop" if generated["stop_reason"] == "end_of_generation"
                                                    else "length")
    chunks = list(client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=24, temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == generated["text"]
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason


def test_chat_uses_the_plain_fallback_streamed_and_not(client, reference):
    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "a loop"}]
    _, expected = reference(fallback_chat_text(messages), 20, ignore_eos=False)
    answer = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_sampling_parameters_and_logprobs(client):
    def sampled(seed: int) -> str:
        return client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=16, temperature=0.9, top_p=0.95,
                                         seed=seed, extra_body={"top_k": 20, "ignore_eos": True}).choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1
    with_logprobs = client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=6, temperature=0, logprobs=3,
                                              extra_body={"ignore_eos": True})
    logprobs = with_logprobs.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    chat = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 5 and "".join(entry.token for entry in entries) == chat.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
               for entry in entries)
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=MODEL_ID, prompt="def ", seed=-1)


def test_stop_strings_cut_the_text(client, reference):
    _, full = reference("def ", 24)
    stop = full[5:8]
    assert stop and full.find(stop) >= 0
    answer = client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=24, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].text == full[: full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL_ID, prompt=[5] * 300, max_tokens=4)  # the context is 256
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_ID, prompt="def ", temperature=5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="def ")
    status, body = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages"


def test_sixteen_concurrent_streams_get_the_tokens_they_get_alone(server, client, reference):
    wait_idle(server)
    before = server.metrics()
    lengths = {prompt: 12 + index for index, prompt in enumerate(PROMPTS)}

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=lengths[prompt], temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(chunk.choices[0].text for chunk in chunks)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = dict(zip(PROMPTS, pool.map(stream, PROMPTS)))
    for prompt in PROMPTS:
        assert texts[prompt] == reference(prompt, lengths[prompt])[1], prompt
    after = wait_idle(server)
    steps = after["mer_batch_sequences_count"] - before["mer_batch_sequences_count"]
    tokens = sum(lengths.values())
    assert after["mer_generated_tokens_total"] - before["mer_generated_tokens_total"] == tokens
    # continuous batching: far fewer steps than tokens, and some step ran the 8 sequences together
    assert steps < tokens / 3
    assert after['mer_batch_sequences_bucket{le=4.0}'] - before['mer_batch_sequences_bucket{le=4.0}'] < steps


def test_a_decode_step_of_four_sequences_looks_up_each_expert_once(server, client):
    wait_idle(server)
    steps_before = {event["step"] for event in server.events_named("serve_step")}

    def stream(prompt: str) -> None:
        list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(stream, PROMPTS[:4]))
    wait_idle(server)
    time.sleep(0.5)  # the log is written in the background
    four = {event["step"] for event in server.events_named("serve_step")
            if event["step"] not in steps_before and event["sequences"] == 4 and event["tokens"] == 4}
    assert four, "no decode step ran the 4 sequences together"
    blocks = [event for event in server.events_named("moe_block_done") if event["token"] in four]
    assert len(blocks) == embedded_geometry().moe_layers * len(four)  # each of the embedded model's MoE blocks, per step
    for block in blocks:
        assert block["tokens"] == 4
        assert block["hits"] + block["misses"] == block["experts"]  # one lookup per distinct expert
        assert block["experts"] <= 4 * 2
    assert any(block["experts"] < 4 * 2 for block in blocks)  # experts shared by sequences computed once


def test_a_client_that_disconnects_frees_its_sequence(server):
    wait_idle(server)
    request = json.dumps({"model": MODEL_ID, "prompt": "def ", "max_tokens": 200, "temperature": 0, "stream": True,
                          "ignore_eos": True}).encode()
    with socket.create_connection((server.host, server.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(request)).encode() + b"\r\n\r\n" + request)
        received = b""
        while received.count(b"data: ") < 3:
            received += connection.recv(65536)
    samples = wait_idle(server, timeout_s=10.0)  # the router frees it at its next step
    assert samples["mer_kv_positions_used"] == 0
    time.sleep(0.5)
    done = server.events_named("sequence_done")[-1]
    assert done["stop_reason"] == "cancelled" and done["reason"] == "client disconnected"
    assert 3 <= done["tokens"] < 200


def test_a_client_that_leaves_before_a_whole_response_frees_its_sequence(server):
    wait_idle(server)
    request = json.dumps({"model": MODEL_ID, "prompt": "class ", "max_tokens": 200, "temperature": 0,
                          "ignore_eos": True}).encode()
    with socket.create_connection((server.host, server.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(request)).encode() + b"\r\n\r\n" + request)
        deadline = time.monotonic() + 30
        while server.metrics()["mer_active_sequences"] == 0:  # running in the router
            assert time.monotonic() < deadline
            time.sleep(0.05)
    wait_idle(server, timeout_s=10.0)
    time.sleep(0.5)
    done = server.events_named("sequence_done")[-1]
    assert done["stop_reason"] == "cancelled" and done["reason"] == "client disconnected" and done["tokens"] < 200


def test_metrics_parse_and_agree_with_the_log(server, client):
    client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=8, temperature=0)
    assert server.post("/v1/completions", {"prompt": "def ", "temperature": 9})[0] == 400
    samples = wait_idle(server)
    time.sleep(0.5)
    done = server.events_named("sequence_done")
    steps = server.events_named("serve_step")
    blocks = server.events_named("moe_block_done")
    assert samples["mer_ready"] == 1
    assert samples["mer_prompt_tokens_total"] == sum(event["prompt_tokens"] for event in done)
    assert samples["mer_steps_total"] == len(steps)
    assert samples["mer_batch_tokens_sum"] == sum(event["tokens"] for event in steps)
    lookups = samples["mer_expert_lookups_total{result=hit}"] + samples["mer_expert_lookups_total{result=miss}"]
    assert lookups == sum(event["hits"] + event["misses"] for event in blocks)
    assert samples["mer_ssd_bytes_read_total"] > 0 and samples["mer_ssd_reads_total"] > 0
    ok = samples["mer_requests_total{endpoint=/v1/completions,status=200}"]
    assert ok >= 1 and samples["mer_time_to_first_token_seconds_count"] >= ok
    assert samples["mer_requests_total{endpoint=/v1/completions,status=400}"] >= 1
    assert samples["mer_cache_slots_used"] == sum(v for k, v in samples.items() if k.startswith("mer_resident_experts{"))
    assert samples["mer_compute_worker_busy_seconds_total{worker=0}"] > 0


def test_top_once_json_reads_the_live_server(server, client):
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            client.completions.create(model=MODEL_ID, prompt="def ", max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})

    worker = threading.Thread(target=load)
    worker.start()
    try:
        result = subprocess.run([MER_PIPELINE, "top", "--url", server.base_url, "--once", "--json", "--interval", "1"],
                                capture_output=True, text=True, timeout=60)
    finally:
        done.set()
        worker.join(60)
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["ready"] is True and view["max_sequences"] == 8 and view["kv_positions"] > 0
    assert view["tokens_per_s"] > 0 and view["steps_per_s"] > 0 and view["mean_itl_ms"] > 0
    assert view["generated_tokens"] >= view["tokens_per_s"] * view["interval_s"] * 0.5
    assert 0 < view["hit_rate_pct"] <= 100
    assert len(view["resident_experts_per_layer"]) == embedded_geometry().moe_layers  # the embedded model's MoE layers
    assert sum(view["resident_experts_per_layer"]) == view["slots_used"] <= view["cache_slots"] + 2  # + prefetch reserve
    assert len(view["worker_busy_pct"]) == 2 and max(view["worker_busy_pct"]) > 0
    shown = subprocess.run([MER_PIPELINE, "top", "--url", server.base_url, "--once", "--interval", "0.2"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "slot map" in shown.stdout and "tokens/s" in shown.stdout
    bad = subprocess.run([MER_PIPELINE, "top", "--url", "http://127.0.0.1:9", "--once"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cannot read" in bad.stderr
