"""The HTTP side of serving without a graph: request checks, stop strings, the hub's admission control."""

from __future__ import annotations

import asyncio

import pytest

from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path
from mer.protocol import SequenceDone, SequenceToken, ServeStep, SubmitSequence
from mer.serve.chat_prompt import chat_tokens, fallback_chat_text
from mer.serve.hub import ServingHub, StreamFailed
from mer.serve.openai_requests import ApiError, ServedModel, parse_chat, parse_completion
from mer.serve.text_stream import CompletionText
from mer.store.gguf_files import open_part


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(open_part(tiny_model_path()))


@pytest.fixture
def served(tokenizer):
    return ServedModel("tiny-moe-q8_0", tokenizer, 256, 2048)


def error_of(parse, body, served) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse(body, served)
    return caught.value


def test_completion_defaults_and_fields(served, tokenizer):
    request = parse_completion({"prompt": "def ", "stop": "\n", "seed": 3, "top_k": 5, "stream": True,
                                "stream_options": {"include_usage": True}, "logprobs": 2, "user": "ignored"}, served)
    assert request.prompt_tokens == tokenizer.encode("def ")
    assert request.max_tokens == 256 - len(request.prompt_tokens)  # the rest of the context
    assert (request.temperature, request.top_p, request.top_k, request.seed) == (1.0, 1.0, 5, 3)
    assert request.stop == ("\n",) and request.stream and request.include_usage and request.logprobs == 2
    assert parse_completion({"prompt": [[1, 5, 9]], "max_tokens": 4}, served).prompt_tokens == [1, 5, 9]


@pytest.mark.parametrize("body,param,status", [
    ({"prompt": "def ", "temperature": 2.5}, "temperature", 400),
    ({"prompt": "def ", "temperature": True}, "temperature", 400),
    ({"prompt": "def ", "top_p": 0}, "top_p", 400),
    ({"prompt": "def ", "max_tokens": 0}, "max_tokens", 400),
    ({"prompt": "def ", "max_tokens": "8"}, "max_tokens", 400),
    ({"prompt": "def ", "seed": -1}, "seed", 400),
    ({"prompt": "def ", "stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({"prompt": "def ", "n": 2}, "n", 400),
    ({"prompt": "def ", "presence_penalty": 0.5}, "presence_penalty", 400),
    ({"prompt": "def ", "logprobs": 6}, "logprobs", 400),
    ({"prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": [1, 4096]}, "prompt", 400),  # the embedded model's vocabulary has 4096 ids
    ({"prompt": [5] * 300}, "prompt", 400),
    ({"prompt": "def ", "model": "gpt-4"}, "model", 404),
])
def test_bad_completion_fields_are_named(served, body, param, status):
    error = error_of(parse_completion, body, served)
    assert (error.status, error.param) == (status, param)
    assert error.body()["error"]["param"] == param and error.body()["error"]["message"]


def test_a_prompt_longer_than_the_context_or_the_pool(served, tokenizer):
    assert error_of(parse_completion, {"prompt": [5] * 257}, served).code == "context_length_exceeded"
    small_pool = ServedModel("m", tokenizer, 256, 10)
    assert error_of(parse_completion, {"prompt": [5] * 11}, small_pool).code == "context_length_exceeded"
    assert error_of(parse_completion, {"prompt": [5] * 10}, small_pool).code == "context_length_exceeded"  # no room
    assert parse_completion({"prompt": [5] * 9, "max_tokens": 50}, small_pool).max_tokens == 50  # stops at the pool


def test_chat_messages_and_the_plain_fallback(served, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    request = parse_chat({"messages": messages, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3},
                         served)
    text = fallback_chat_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert text == "system: Be brief.\nuser: hi\nassistant:"
    assert request.prompt_tokens == tokenizer.encode(text) == chat_tokens(tokenizer, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert request.max_tokens == 7 and request.want_logprobs and request.logprobs == 3
    assert error_of(parse_chat, {"messages": []}, served).param == "messages"
    assert error_of(parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                    served).param == "messages"
    assert error_of(parse_chat, [1, 2], served).status == 400


def test_stop_strings_are_held_back_then_cut(tokenizer):
    tokens = tokenizer.encode("x = 1\nreturn x", add_special=False)
    text = CompletionText(tokenizer, ["\nret"])
    emitted = "".join(text.add(token) for token in tokens) + text.finish()
    assert emitted == "x = 1" and text.stopped
    held = CompletionText(tokenizer, ["zzz"])
    pieces = [held.add(token) for token in tokenizer.encode("ab zz", add_special=False)]
    assert "".join(pieces) + held.finish() == "ab zz"  # "zz" was held back, then released at the end
    assert not "".join(pieces).endswith("zz")
    plain = CompletionText(tokenizer)
    assert "".join(plain.add(t) for t in tokens) + plain.finish() == tokenizer.decode(tokens)


def test_the_hub_admits_up_to_sequences_plus_queue_and_routes_reports(served):
    sent = []

    async def send(message) -> None:
        sent.append(message)

    async def scenario() -> None:
        hub = ServingHub(max_sequences=2, max_queue=1, send=send)
        request = parse_completion({"prompt": "def ", "max_tokens": 3}, served)
        with pytest.raises(ApiError, match="loading"):
            await hub.open(request)
        hub.on_message(ServeStep(0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, [], [], 0, 0, 0))
        streams = [await hub.open(request) for _ in range(3)]
        with pytest.raises(ApiError) as full:
            await hub.open(request)
        assert full.value.status == 503 and full.value.code == "overloaded"
        assert [type(m) for m in sent] == [SubmitSequence] * 3 and sent[0].max_tokens == 3
        hub.on_message(SequenceToken(streams[0].request_id, 0, 42))
        hub.on_message(SequenceDone(streams[0].request_id, "max_tokens", 2, 1))
        assert (await streams[0].next()).token == 42 and isinstance(await streams[0].next(), SequenceDone)
        assert hub.num_in_flight == 2
        await hub.open(request)  # room again
        hub.fail_all("SIGTERM")
        assert isinstance(await streams[1].next(), StreamFailed) and hub.num_in_flight == 0
        with pytest.raises(ApiError, match="shutting down"):
            await hub.open(request)

    asyncio.run(scenario())
