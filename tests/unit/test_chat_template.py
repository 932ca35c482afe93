"""Chat templates from the GGUF (`tokenizer.chat_template`), rendered in Jinja2's sandbox."""

from __future__ import annotations

import dataclasses

import pytest

from mer.errors import TokenizerError
from mer.model.chat_template import chat_prompt_tokens, render_chat
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from tests.support.gguf_models import write_tiny_moe_gguf

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2 = "{{ bos_token }}{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat")
    paths = {kind: write_tiny_moe_gguf(directory / f"{kind}.gguf", n_layers=1, tokenizer=kind, vocab_size=400).path
             for kind in ("spm", "bpe")}
    return {kind: load_tokenizer(MoEModel.load(path).source.parts[0]) for kind, path in paths.items()}


def test_chatml_is_rendered_and_its_special_tokens_parsed(tokenizers):
    tokenizer = dataclasses.replace(tokenizers["bpe"], chat_template=CHATML)
    text = render_chat(tokenizer, [{"role": "user", "content": "hi there"}])
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    tokens = chat_prompt_tokens(tokenizer, "hi there")
    assert tokens == tokenizer.encode(text, add_special=False, parse_special=True)
    assert tokens.count(tokenizer.piece_ids["<|im_start|>"]) == 2
    assert tokens.count(tokenizer.piece_ids["<|im_end|>"]) == 1


def test_a_template_that_writes_bos_gets_no_second_bos(tokenizers):
    tokenizer = dataclasses.replace(tokenizers["spm"], chat_template=LLAMA2)
    tokens = chat_prompt_tokens(tokenizer, "hello")
    assert tokens[0] == tokenizer.bos_id and tokens[1] != tokenizer.bos_id
    assert tokenizer.decode(tokens) == " [INST] hello [/INST]"  # BOS is not decoded; SPM prefixes a space
    plain = dataclasses.replace(tokenizers["spm"], chat_template="{{ messages[0]['content'] }}")
    assert chat_prompt_tokens(plain, "hello") == tokenizer.encode("hello")  # BOS added as the vocabulary says


def test_a_missing_refusing_or_escaping_template_is_a_tokenizer_error(tokenizers):
    with pytest.raises(TokenizerError, match="no tokenizer.chat_template"):
        render_chat(tokenizers["spm"], [{"role": "user", "content": "x"}])
    refusing = dataclasses.replace(tokenizers["spm"], chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        render_chat(refusing, [{"role": "user", "content": "x"}])
    escaping = dataclasses.replace(tokenizers["spm"], chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="cannot be rendered"):
        render_chat(escaping, [{"role": "user", "content": "x"}])
    broken = dataclasses.replace(tokenizers["spm"], chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="cannot be rendered"):
        render_chat(broken, [{"role": "user", "content": "x"}])


def test_loop_controls_and_the_generation_block_render_as_in_hugging_face(tokenizers):
    template = ("{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
                "{% if loop.index > 3 %}{% break %}{% endif %}"
                "{% if message['role'] == 'assistant' %}{% generation %}[{{ message['content'] }}]{% endgeneration %}"
                "{% else %}<{{ message['content'] }}>{% endif %}{% endfor %}")
    tokenizer = dataclasses.replace(tokenizers["bpe"], chat_template=template)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_chat(tokenizer, messages) == "<a>[b]"


def test_tojson_is_plain_json_in_the_given_key_order(tokenizers):
    template = "{% for message in messages %}{{ message['arguments'] | tojson }}{% endfor %}"
    tokenizer = dataclasses.replace(tokenizers["bpe"], chat_template=template)
    rendered = render_chat(tokenizer, [{"role": "user", "arguments": {"z": "<ü>&'", "a": [1, 2.5, None]}}])
    assert rendered == '{"z": "<ü>&\'", "a": [1, 2.5, null]}'
