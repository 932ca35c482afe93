"""deepseek2 and glm4moe chat prompts: the tiny GGUFs of the test generators carry a template in each
model family's format (DeepSeek's `<｜User｜>` / `<｜Assistant｜>` turns after BOS, GLM's `[gMASK]<sop>` and
`<|role|>` lines); mer renders each conversation exactly as Hugging Face's chat-template environment
does (llama-cpp-python's `Jinja2ChatFormatter`, which reproduces it), and the prompt's ids are llama.cpp's
for the rendered text with special tokens parsed (BOS once: DeepSeek's template writes it itself).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mer.model.chat_template import chat_messages_tokens, render_chat
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf
from tests.support.glm4moe_models import write_tiny_glm4moe_gguf

llama_chat_format = pytest.importorskip("llama_cpp.llama_chat_format")

from tests.support.llama_reference import open_llama  # noqa: E402

CONVERSATIONS = {
    "user": [{"role": "user", "content": "héllo 123"}],
    "several turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me a joke <with> 'quotes' & ümlauts"}],
}
WRITERS = {"deepseek2": lambda path: write_tiny_deepseek2_gguf(path, style="v3", n_layers=2),
           "glm4moe": lambda path: write_tiny_glm4moe_gguf(path, n_layers=2)}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def model(request, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(f"{request.param}-template") / f"{request.param}.gguf"
    WRITERS[request.param](path)
    return request.param, path


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_each_conversation_renders_as_hugging_face_s_environment_and_tokenizes_as_llama_cpp(model, name):
    arch, path = model
    tokenizer = load_tokenizer(MoEModel.load(path).source.parts[0])
    assert tokenizer.chat_template
    bos = tokenizer.pieces[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
    eos = tokenizer.pieces[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
    expected = llama_chat_format.Jinja2ChatFormatter(tokenizer.chat_template, eos_token=eos, bos_token=bos)(
        messages=CONVERSATIONS[name]).prompt
    rendered = render_chat(tokenizer, CONVERSATIONS[name])
    assert rendered == expected
    ids = chat_messages_tokens(tokenizer, CONVERSATIONS[name])
    llm = open_llama(path)
    assert ids == llm.tokenize(rendered.encode(), add_bos=False, special=True)
    specials = {"deepseek2": ("<｜User｜>", "<｜Assistant｜>"), "glm4moe": ("[gMASK]", "<|user|>", "<|assistant|>")}[arch]
    for special in specials:  # each of the format's markers is one token, not its characters
        assert tokenizer.pieces.index(special) in ids, special
    if arch == "deepseek2":
        assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
