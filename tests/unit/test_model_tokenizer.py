"""The GGUF tokenizer without llama.cpp: hand-checked encodings, round trips, specials, errors.

(Token-for-token parity with llama.cpp's own tokenizer is in tests/integration/test_llama_parity.py.)
"""

from __future__ import annotations

import pytest
from gguf import GGUFWriter

from mer.errors import TokenizerError
from mer.model.tokenizer import SPACE_MARK, load_tokenizer
from mer.model.tokenizer_algorithms import compile_pre_tokenizer, from_byte_level, split_words, to_byte_level
from mer.store.gguf_files import open_part
from tests.support.gguf_models import write_tiny_moe_gguf

TEXTS = ["the quick brown fox", "hello  world\tand\nnewlines", "héllo wörld — ☃ 日本 🙂", "  leading", "trailing  ",
         "don't we'll 12345 3.14!!", ""]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    return {kind: load_tokenizer(open_part(write_tiny_moe_gguf(directory / f"{kind}.gguf", tokenizer=kind,
                                                               vocab_size=400, n_layers=1).path))
            for kind in ("spm", "bpe")}


def test_spm_merges_by_score_and_falls_back_to_bytes(tokenizers):
    spm = tokenizers["spm"]
    assert (spm.kind, spm.bos_id, spm.eos_id, spm.add_bos, spm.add_space_prefix) == ("spm", 1, 2, True, True)
    ids = spm.encode("the router")
    assert ids[0] == 1 and [spm.pieces[token] for token in ids[1:]] == [f"{SPACE_MARK}the", f"{SPACE_MARK}router"]
    accented = spm.encode("é", add_special=False)
    assert [spm.pieces[token] for token in accented] == [SPACE_MARK, "<0xC3>", "<0xA9>"]
    assert spm.encode("", add_special=True) == [1] and spm.encode("", add_special=False) == []


def test_bpe_splits_words_and_applies_merges_by_rank(tokenizers):
    bpe = tokenizers["bpe"]
    assert (bpe.kind, bpe.add_bos, bpe.pre_tokenizer) == ("bpe", False, "qwen2")
    assert [bpe.pieces[token] for token in bpe.encode("the the")] == ["the", "\u0120the"]
    pieces = [bpe.pieces[token] for token in bpe.encode(" experts")]
    assert "".join(pieces) == "\u0120experts" and 1 < len(pieces) < len(" experts")
    assert bpe.encode("<|im_start|>hi", parse_special=True)[0] == bpe.piece_ids["<|im_start|>"]
    assert bpe.piece_ids["<|im_start|>"] not in bpe.encode("<|im_start|>hi", parse_special=False)
    assert bpe.end_of_generation_ids == {bpe.piece_ids["<|im_end|>"], bpe.piece_ids["<|endoftext|>"]}


@pytest.mark.parametrize("kind", ["spm", "bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizers, kind, text):
    tokenizer = tokenizers[kind]
    decoded = tokenizer.decode(tokenizer.encode(text, add_special=False))
    assert decoded == (" " + text if kind == "spm" and text else text)


def test_control_tokens_decode_only_when_asked(tokenizers):
    spm = tokenizers["spm"]
    assert spm.token_bytes(2) == b"" and spm.token_bytes(2, special=True) == b"</s>"
    with pytest.raises(TokenizerError, match="token id 400 is outside the vocabulary of 400 tokens"):
        spm.token_bytes(400)


def test_pre_tokenizer_split_and_byte_alphabet():
    expressions, _, _ = compile_pre_tokenizer("qwen2")
    assert split_words("Hello, world!\n\n  x 123", expressions) == ["Hello", ",", " world", "!\n\n", " ", " x", " ",
                                                                    "1", "2", "3"]
    text = "tab\tnew\nline é ☃"
    assert from_byte_level(to_byte_level(text)).decode() == text and " " not in to_byte_level(text)
    with pytest.raises(TokenizerError, match="pre-tokenizer 'nonesuch' is not supported"):
        compile_pre_tokenizer("nonesuch")


def test_unsupported_vocabularies_are_refused(tmp_path):
    writer = GGUFWriter(tmp_path / "v.gguf", "llama")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match=r"v\.gguf: tokenizer\.ggml\.model is 'bert' with 2 tokens"):
        load_tokenizer(open_part(tmp_path / "v.gguf"))
