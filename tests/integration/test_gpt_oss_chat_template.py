"""gpt-oss-20b's real chat template (`tests/fixtures/gpt-oss-20b-chat-template.jinja`, byte for byte
the model's own) in a tiny gpt-oss GGUF: mer renders every kind of conversation the template knows
exactly as Hugging Face's chat-template environment does (here llama-cpp-python's
`Jinja2ChatFormatter`, which reproduces it), the simplest one also as the harmony format written
out by hand, and the rendered prompt tokenizes into llama.cpp's ids (special tokens parsed).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from mer.errors import TokenizerError
from mer.model.chat_template import chat_messages_tokens, render_chat
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from tests.support.gpt_oss_models import write_tiny_gpt_oss_gguf

llama_chat_format = pytest.importorskip("llama_cpp.llama_chat_format")

from tests.support.llama_reference import open_llama  # noqa: E402

TEMPLATE = (Path(__file__).resolve().parents[1] / "fixtures" / "gpt-oss-20b-chat-template.jinja").read_text()

CONVERSATIONS = {
    "user": [{"role": "user", "content": "héllo 123"}],
    "system and user": [{"role": "system", "content": "Answer in French."},
                        {"role": "user", "content": "What is 2 + 2?"}],
    "developer": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "several turns": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!", "thinking": "Greet back."},
                      {"role": "user", "content": "Tell me a joke <with> 'quotes' & ümlauts"}],
    "a tool call": [{"role": "user", "content": "Weather in Zürich?"},
                    {"role": "assistant", "thinking": "Use the tool.",
                     "tool_calls": [{"function": {"name": "weather",
                                                  "arguments": {"city": "Zürich", "unit": "°C", "note": "<b>&'"}}}]},
                    {"role": "tool", "content": "{\"temp\": 21}"}],
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpt-oss-template") / "tiny-gpt-oss-real-template.gguf"
    write_tiny_gpt_oss_gguf(path, expert_dtype="f32", dense_dtype="f32", n_layers=1, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(MoEModel.load(model_path).source.parts[0])


def test_the_gguf_carries_the_real_template(tokenizer):
    assert tokenizer.chat_template == TEMPLATE
    assert len(TEMPLATE.encode()) == 16738 and "Knowledge cutoff: 2024-06" in TEMPLATE


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_every_conversation_renders_as_hugging_face_s_environment_does(tokenizer, name):
    reference = llama_chat_format.Jinja2ChatFormatter(
        TEMPLATE, eos_token=tokenizer.pieces[tokenizer.eos_id], bos_token=tokenizer.pieces[tokenizer.bos_id])
    expected = reference(messages=CONVERSATIONS[name]).prompt
    assert render_chat(tokenizer, CONVERSATIONS[name]) == expected


def test_the_simplest_conversation_is_the_harmony_format(tokenizer):
    today = datetime.date.today().strftime("%Y-%m-%d")
    rendered = render_chat(tokenizer, CONVERSATIONS["system and user"])
    if datetime.date.today().strftime("%Y-%m-%d") != today:  # midnight passed while rendering
        rendered = render_chat(tokenizer, CONVERSATIONS["system and user"])
        today = datetime.date.today().strftime("%Y-%m-%d")
    assert rendered == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n"
        f"Current date: {today}\n\n"
        "Reasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nAnswer in French.\n\n<|end|>"  # the template's "\n\n"
        "<|start|>user<|message|>What is 2 + 2?<|end|>"
        "<|start|>assistant")


def test_tool_call_arguments_are_plain_json(tokenizer):
    rendered = render_chat(tokenizer, CONVERSATIONS["a tool call"])
    assert ('<|start|>assistant to=functions.weather<|channel|>commentary json<|message|>'
            '{"city": "Zürich", "unit": "°C", "note": "<b>&\'"}<|call|>') in rendered
    assert "<|start|>functions.weather to=assistant<|channel|>commentary<|message|>" in rendered


def test_the_template_s_own_refusal_is_a_clear_error(tokenizer):
    bad = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "<|channel|>final<|message|>Hello"},
           {"role": "user", "content": "again"}]
    with pytest.raises(TokenizerError, match="the chat template refused the conversation: You have passed a "
                                             "message containing <|channel|> tags"):
        render_chat(tokenizer, bad)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_the_rendered_prompt_tokenizes_as_llama_cpp_parses_it(model_path, tokenizer, name):
    llm = open_llama(model_path)
    rendered = render_chat(tokenizer, CONVERSATIONS[name])
    ids = chat_messages_tokens(tokenizer, CONVERSATIONS[name])
    assert ids == llm.tokenize(rendered.encode(), add_bos=False, special=True)
    assert ids[0] == tokenizer.pieces.index("<|start|>")  # the GGUF adds no BOS (tokenizer.ggml.add_bos_token false)
