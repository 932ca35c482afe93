"""OpenAI response objects: completions and chat completions, whole or as server-sent-event chunks.

`ResponseShape` builds the objects of one request (its id, creation time and model); token strings of
logprobs are the tokens' bytes decoded as UTF-8 (invalid bytes replaced).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from mer.model.tokenizer import Tokenizer
from mer.protocol import SequenceToken
from mer.serve.completions import CompletionTally, Piece


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` (or a literal such as `[DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def usage(tally: CompletionTally) -> dict[str, int]:
    return {"prompt_tokens": tally.prompt_tokens, "completion_tokens": tally.completion_tokens,
            "total_tokens": tally.prompt_tokens + tally.completion_tokens}


@dataclass
class ResponseShape:
    """The objects of one response (see the module docstring)."""

    chat: bool
    model_id: str
    tokenizer: Tokenizer
    logprobs: int  # alternatives wanted per token
    want_logprobs: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def _header(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_id}

    def whole(self, pieces: list[Piece], tally: CompletionTally) -> dict[str, Any]:
        """The non-streamed response."""
        text = "".join(piece.text for piece in pieces)
        finish = pieces[-1].finish_reason if pieces else "length"
        tokens = [piece.token for piece in pieces if piece.token is not None]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self._chat_logprobs(tokens), "finish_reason": finish}
            return {**self._header("chat.completion"), "choices": [choice], "usage": usage(tally)}
        choice = {"index": 0, "text": text, "logprobs": self._completion_logprobs(tokens, pieces),
                  "finish_reason": finish}
        return {**self._header("text_completion"), "choices": [choice], "usage": usage(tally)}

    def chunk(self, piece: Piece | None, *, first: bool = False) -> dict[str, Any]:
        """A streamed chunk: the role (chat's first), or a piece's text and its finish reason."""
        tokens = [] if piece is None or piece.token is None else [piece.token]
        finish = None if piece is None else piece.finish_reason
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if piece is not None and (piece.text or not finish):
                delta["content"] = piece.text
            choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(tokens) if tokens else None,
                      "finish_reason": finish}
            return {**self._header("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": "" if piece is None else piece.text,
                  "logprobs": self._completion_logprobs(tokens, [piece]) if tokens else None, "finish_reason": finish}
        return {**self._header("text_completion"), "choices": [choice]}

    def usage_chunk(self, tally: CompletionTally) -> dict[str, Any]:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return {**self._header("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(tally)}

    def _completion_logprobs(self, tokens: list[SequenceToken], pieces: list[Piece]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        texts = [self._token_text(token.token) for token in tokens]
        offsets, offset = [], 0
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [token.logprob for token in tokens],
                "top_logprobs": [{self._token_text(i): lp for i, lp in
                                  zip(token.top_ids[: self.logprobs], token.top_logprobs[: self.logprobs])}
                                 for token in tokens],
                "text_offset": offsets}

    def _chat_logprobs(self, tokens: list[SequenceToken]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"content": [self._chat_entry(token.token, token.logprob) | {"top_logprobs": [
            self._chat_entry(i, lp) for i, lp in zip(token.top_ids[: self.logprobs], token.top_logprobs[: self.logprobs])]}
            for token in tokens]}

    def _chat_entry(self, token: int, logprob: float | None) -> dict[str, Any]:
        return {"token": self._token_text(token), "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token))}
