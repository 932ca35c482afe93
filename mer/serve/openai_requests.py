"""OpenAI request bodies, checked: `/v1/completions` and `/v1/chat/completions` (docs/serving.md).

A bad field is an `ApiError` (400, OpenAI's error object naming the field); a prompt that does not fit
the context (or the KV pool) is 400 `context_length_exceeded`; an unknown model is 404. Fields a
client sends that mer does not implement are accepted at their neutral value (e.g.
`presence_penalty: 0`) and refused otherwise; other unknown fields are ignored, as OpenAI's clients
send many. Sampling: `temperature` (default 1, 0 is greedy), `top_p`, `top_k` (an extension),
`seed`, `max_tokens` (default: the rest of the context; a longer one stops at the context with
`finish_reason: length`), `stop` (a string or up to 4), `ignore_eos` (an extension), completions'
`logprobs` (0..5) and chat's `logprobs` / `top_logprobs` (0..20).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mer.model.tokenizer import Tokenizer
from mer.serve.chat_prompt import chat_tokens

MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
NEUTRAL_VALUES = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "echo": False,
                  "logit_bias": {}, "suffix": None}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status and the `{"error": {...}}` object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 error_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.error_type, self.code = status, message, param, error_type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What requests are checked against: the model's id, tokenizer, context and the KV pool."""

    model_id: str
    tokenizer: Tokenizer
    context_length: int
    kv_positions: int

    @property
    def max_positions(self) -> int:
        return min(self.context_length, self.kv_positions)


@dataclass(frozen=True)
class GenerationRequest:
    """A checked completion or chat request."""

    prompt_tokens: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int  # alternatives per token (0: none)
    want_logprobs: bool  # chat: `logprobs: true` (with top_logprobs alternatives, possibly 0)
    ignore_eos: bool


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bound = f"({low}" if low_open else f"[{low}"
        raise ApiError(400, f"{name} must be a number in {bound}, {high}], got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        wanted = f">= {low}" if high is None else f"in {low}..{high}"
        raise ApiError(400, f"{name} must be an integer {wanted}, got {value!r}", name)
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or len(values) > MAX_STOP_STRINGS or not all(isinstance(v, str) for v in values):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, got {value!r}",
                       "stop")
    return tuple(values)


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name, neutral in NEUTRAL_VALUES.items():
        if body.get(name) not in (None, neutral):
            raise ApiError(400, f"{name}={body[name]!r} is not supported by mer (only {neutral!r})", name)


def _check_model(body: Mapping[str, Any], served: ServedModel) -> None:
    model = body.get("model")
    if model is not None and model != served.model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served.model_id!r}", "model",
                       code="model_not_found")


def _generation(body: Mapping[str, Any], served: ServedModel, prompt: list[int], *, logprobs: int,
                want_logprobs: bool, max_tokens_names: Sequence[str]) -> GenerationRequest:
    if not prompt:
        raise ApiError(400, "the prompt is empty: generation needs at least one token", "prompt")
    if len(prompt) > served.max_positions:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens, more than this model's context of "
                            f"{served.max_positions} tokens", "messages" if "messages" in body else "prompt",
                       code="context_length_exceeded")
    remaining = served.max_positions - len(prompt)
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _integer(body, name, max_tokens, 1)
    if max_tokens is None:
        max_tokens = remaining
    if max_tokens < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens and fills the context of {served.max_positions}: "
                            f"no room for a completion", "prompt", code="context_length_exceeded")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise ApiError(400, f"stream_options must be an object, got {stream_options!r}", "stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, f"ignore_eos must be a boolean, got {ignore_eos!r}", "ignore_eos")
    return GenerationRequest(
        prompt_tokens=prompt, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=_integer(body, "top_k", 0, 0) or 0,
        seed=_integer(body, "seed", None, 0, 2**64 - 1), stop=_stop(body), stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)), logprobs=logprobs,
        want_logprobs=want_logprobs, ignore_eos=ignore_eos)


def _object_body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_completion(body: Any, served: ServedModel) -> GenerationRequest:
    """A `/v1/completions` body: `prompt` is a string, a list of token ids, or a list of one of those."""
    body = _object_body(body)
    _check_model(body, served)
    _check_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = served.tokenizer.encode(prompt, add_special=True, parse_special=False)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        vocab = served.tokenizer.vocab_size
        if any(not 0 <= token < vocab for token in ids):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", "prompt")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    logprobs = _integer(body, "logprobs", 0, 0, 5) or 0
    return _generation(body, served, ids, logprobs=logprobs, want_logprobs=logprobs > 0,
                       max_tokens_names=("max_tokens",))


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The `messages` of a chat body as `{"role", "content"}` strings (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            if not all(isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", "messages")
            content = "".join(part["text"] for part in content)
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise ApiError(400, f"messages[{index}] must have a role in {CHAT_ROLES} and a string content",
                           "messages")
        checked.append({"role": role, "content": content})
    return checked


def parse_chat(body: Any, served: ServedModel) -> GenerationRequest:
    """A `/v1/chat/completions` body."""
    body = _object_body(body)
    _check_model(body, served)
    _check_unsupported(body)
    want_logprobs = body.get("logprobs", False)
    if not isinstance(want_logprobs, bool):
        raise ApiError(400, f"logprobs must be a boolean for chat completions, got {want_logprobs!r}", "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, 20) or 0
    ids = chat_tokens(served.tokenizer, chat_messages(body))
    return _generation(body, served, ids, logprobs=top if want_logprobs else 0, want_logprobs=want_logprobs,
                       max_tokens_names=("max_tokens", "max_completion_tokens"))
