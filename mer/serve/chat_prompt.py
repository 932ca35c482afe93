"""A chat request's prompt: the GGUF's chat template, or mer's plain fallback for a model without one.

With `tokenizer.chat_template` the messages are rendered by it (`mer.model.chat_template`, with the
generation prompt, special tokens parsed, BOS as the vocabulary says). Without one (the embedded
model has none) the fallback is plain text, one line per message, then the assistant's turn:

    system: You are terse.
    user: Hello
    assistant:

tokenized like a `--prompt` (BOS as the vocabulary says). `fallback_chat_text` gives that text, so
`mer-pipeline generate --prompt "$(...)"` reproduces a chat completion.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.model.chat_template import chat_messages_tokens
from mer.model.tokenizer import Tokenizer


def fallback_chat_text(messages: Sequence[dict[str, str]]) -> str:
    """The plain chat format of a model without a chat template (see the module docstring)."""
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant:"


def chat_tokens(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt ids of a conversation: the model's template, else the plain fallback."""
    if tokenizer.chat_template:
        return chat_messages_tokens(tokenizer, messages)
    return tokenizer.encode(fallback_chat_text(messages), add_special=True, parse_special=False)
