"""Rendering a GGUF's chat template (`tokenizer.chat_template`, a Jinja2 template as in Hugging Face).

`render_chat(tokenizer, messages)` renders the conversation with `add_generation_prompt=True`,
`bos_token` / `eos_token` set to the vocabulary's pieces, `raise_exception` and `strftime_now`,
in Jinja2's immutable sandbox (a template cannot reach Python objects), in the environment Hugging
Face's `apply_chat_template` gives templates, which is what their authors test them in: blocks
trimmed, the `loopcontrols` extension (`{% break %}`, `{% continue %}`), the `{% generation %}`
block rendered as its body, and `tojson` as plain `json.dumps` (non-ASCII kept, no HTML escaping,
keys in their order; Jinja2's own `tojson` escapes `<`, `>`, `&` and `'` and sorts the keys, so a
tool call's arguments would render differently: gpt-oss's template writes them with `tojson`). The result is tokenized
with special tokens parsed; `chat_prompt_tokens` adds BOS as the vocabulary says unless the
template already starts with it (no double BOS).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from mer.errors import TokenizerError
from mer.model.tokenizer import Tokenizer


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"the chat template refused the conversation: {message}")


def _strftime_now(format_string: str) -> str:
    return datetime.datetime.now().strftime(format_string)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """`tojson` as chat templates expect it (see the module docstring)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment():
    """The sandboxed Jinja2 environment of chat templates (see the module docstring)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: marks the assistant's text for training masks; rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)  # the tag's name
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return environment


def _piece(tokenizer: Tokenizer, token: int | None) -> str:
    return tokenizer.pieces[token] if token is not None else ""


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text for `messages` (`[{"role": "user", "content": ...}, ...]`; a message may carry
    the other fields its template reads, e.g. gpt-oss's `thinking` and `tool_calls`)."""
    if not tokenizer.chat_template:
        raise TokenizerError("the model has no tokenizer.chat_template: --chat needs one (use --prompt alone)")
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise TokenizerError("--chat needs the jinja2 package to render the chat template") from None
    try:
        template = _environment().from_string(tokenizer.chat_template)
        return template.render(messages=list(messages), add_generation_prompt=True,
                               bos_token=_piece(tokenizer, tokenizer.bos_id),
                               eos_token=_piece(tokenizer, tokenizer.eos_id))
    except jinja2.TemplateError as error:
        raise TokenizerError(f"the model's chat template cannot be rendered: {error}") from None


def chat_prompt_tokens(tokenizer: Tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-message chat: the rendered template, special tokens parsed."""
    return chat_messages_tokens(tokenizer, [{"role": "user", "content": user_text}])


def chat_messages_tokens(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of a conversation: the rendered template, special tokens parsed."""
    text = render_chat(tokenizer, messages)
    bos_text = _piece(tokenizer, tokenizer.bos_id)
    tokens = tokenizer.encode(text, add_special=False, parse_special=True)
    if tokenizer.add_bos and tokenizer.bos_id is not None and not (bos_text and text.startswith(bos_text)):
        tokens = [tokenizer.bos_id, *tokens]
    return tokens
