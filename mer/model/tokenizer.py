"""The tokenizer stored in a GGUF (`tokenizer.ggml.*`), encoding and decoding as llama.cpp does.

Read from the metadata: `model` ("llama": SentencePiece-style with byte fallback; "gpt2":
byte-level BPE), `tokens`, `scores`, `token_type`, `merges`, `pre` (the BPE pre-tokenizer),
`bos/eos/unknown/eot/eom_token_id`, `add_bos_token`, `add_eos_token`, `add_space_prefix` and
`tokenizer.chat_template`. The algorithms are in `mer.model.tokenizer_algorithms`; this module
adds what llama.cpp's `tokenize` does around them:

- special tokens in the text become their ids before the subword algorithm runs: user-defined
  tokens always, control (and unknown) tokens only with `parse_special=True`; longer ones first;
- SentencePiece-style: a space is put before the text at the start and after every special
  token when `add_space_prefix` (default true), then spaces become U+2581;
- BOS (and EOS) are added when `add_special` and the vocabulary's `add_bos_token` /
  `add_eos_token` say so (defaults: true for "llama", false for "gpt2" except llama3-style
  pre-tokenizers).

Decoding turns each token into its bytes (U+2581 back to spaces, `<0xXX>` byte tokens and GPT-2's
byte alphabet to bytes); control tokens decode to nothing unless `special=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gguf import TokenType

from mer.errors import TokenizerError
from mer.model.tokenizer_algorithms import (
    bpe_tokenize_word,
    compile_pre_tokenizer,
    from_byte_level,
    spm_tokenize,
    split_words,
    to_byte_level,
)
from mer.store.gguf_files import GGUFPart

SPACE_MARK = "\u2581"
END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                           "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<|return|>", "<|call|>")
_KEY = "tokenizer.ggml."


@dataclass
class Tokenizer:
    """A GGUF vocabulary and the rules to encode text with it (see the module docstring)."""

    kind: str  # "spm" or "bpe"
    pieces: list[str]
    token_types: list[int]
    scores: list[float]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool = False
    add_space_prefix: bool = True
    merge_ranks: dict[tuple[str, str], int] = field(default_factory=dict)
    pre_tokenizer: str = "default"
    extra_end_ids: tuple[int, ...] = ()
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.piece_ids = {piece: index for index, piece in reversed(list(enumerate(self.pieces)))}
        self._expressions, self._ignore_merges, _ = (compile_pre_tokenizer(self.pre_tokenizer) if self.kind == "bpe"
                                                     else ([], False, False))
        specials = [index for index, kind in enumerate(self.token_types)
                    if kind in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN) and self.pieces[index]]
        self._specials = sorted(specials, key=lambda index: -len(self.pieces[index]))

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def end_of_generation_ids(self) -> frozenset[int]:
        """EOS and the other end-of-turn tokens llama.cpp stops on."""
        ids = {self.eos_id, *self.extra_end_ids}
        ids.update(self.piece_ids[text] for text in END_OF_GENERATION_TEXTS
                   if text in self.piece_ids and self.token_types[self.piece_ids[text]] == TokenType.CONTROL)
        return frozenset(token for token in ids if token is not None)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text` (with BOS/EOS when `add_special` and the vocabulary asks for them)."""
        output: list[int] = []
        if add_special and self.add_bos:
            output.append(self._required(self.bos_id, "bos_token_id"))
        previous_is_special = True
        for fragment in self._fragments(text, parse_special):
            if isinstance(fragment, int):
                output.append(fragment)
                previous_is_special = True
                continue
            if self.kind == "spm":
                prefix = " " if self.add_space_prefix and previous_is_special else ""
                output.extend(spm_tokenize((prefix + fragment).replace(" ", SPACE_MARK), self.piece_ids,
                                           self.scores, self._byte_token))
            else:
                for word in split_words(fragment, self._expressions):
                    output.extend(bpe_tokenize_word(to_byte_level(word), self.piece_ids, self.merge_ranks,
                                                    self._ignore_merges))
            previous_is_special = False
        if add_special and self.add_eos:
            output.append(self._required(self.eos_id, "eos_token_id"))
        return output

    def _fragments(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` split into raw text and special token ids (llama.cpp's tokenizer_st_partition)."""
        fragments: list[str | int] = [text] if text else []
        for token in self._specials:
            if not parse_special and self.token_types[token] != TokenType.USER_DEFINED:
                continue
            piece, split = self.pieces[token], []
            for fragment in fragments:
                if isinstance(fragment, int) or piece not in fragment:
                    split.append(fragment)
                    continue
                for index, part in enumerate(fragment.split(piece)):
                    if index:
                        split.append(token)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _byte_token(self, value: int) -> int:
        for text in (f"<0x{value:02X}>", chr(value)):
            if text in self.piece_ids:
                return self.piece_ids[text]
        raise TokenizerError(f"byte 0x{value:02X} has no byte token <0x{value:02X}> in the vocabulary")

    def _required(self, token: int | None, key: str) -> int:
        if token is None:
            raise TokenizerError(f"the vocabulary needs {_KEY}{key} but does not set it")
        return token

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for (control tokens: b"" unless `special`)."""
        if not 0 <= token < self.vocab_size:
            raise TokenizerError(f"token id {token} is outside the vocabulary of {self.vocab_size} tokens")
        kind, piece = self.token_types[token], self.pieces[token]
        if kind in (TokenType.CONTROL, TokenType.UNUSED):
            return piece.encode("utf-8") if special else b""
        if self.kind == "spm":
            if kind == TokenType.BYTE:
                return bytes((int(piece[3:5], 16),))
            if kind == TokenType.UNKNOWN:
                return "\u2585".encode("utf-8")
            return piece.replace(SPACE_MARK, " ").encode("utf-8")
        return piece.encode("utf-8") if kind == TokenType.USER_DEFINED else from_byte_level(piece)

    def decode(self, tokens: list[int], special: bool = False) -> str:
        """The text of `tokens` (invalid UTF-8 replaced by U+FFFD)."""
        return b"".join(self.token_bytes(token, special) for token in tokens).decode("utf-8", errors="replace")


# gpt-oss's harmony tokens that llama.cpp makes user-defined whatever the vocabulary says (its "quick hack
# for gpt-oss", checked against the installed llama.cpp): parsed in any text and rendered as their text.
ALWAYS_PARSED_TEXTS = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>", "<|end|>"})


def load_tokenizer(part: GGUFPart) -> Tokenizer:
    """The tokenizer of a GGUF (its first part); TokenizerError naming the file and key."""
    model = part.value(_KEY + "model")
    pieces = part.value(_KEY + "tokens")
    if model not in ("llama", "gpt2") or not isinstance(pieces, list) or not pieces:
        raise TokenizerError(f"{part.path}: {_KEY}model is {model!r} with {len(pieces or [])} tokens; mer reads "
                             f"'llama' (SentencePiece-style) and 'gpt2' (byte-level BPE) vocabularies")
    kind = "spm" if model == "llama" else "bpe"
    types = _list(part, "token_type", [TokenType.NORMAL] * len(pieces), len(pieces))
    types = [TokenType.USER_DEFINED if piece in ALWAYS_PARSED_TEXTS else kind for piece, kind in zip(pieces, types)]
    pre = part.value(_KEY + "pre") or "default"
    try:
        _, _, bpe_add_bos = compile_pre_tokenizer(pre) if kind == "bpe" else ([], False, True)
    except TokenizerError as error:
        raise TokenizerError(f"{part.path}: {error}") from None
    return Tokenizer(
        kind=kind, pieces=[str(piece) for piece in pieces], token_types=[int(kind) for kind in types],
        scores=[float(score) for score in _list(part, "scores", [0.0] * len(pieces), len(pieces))],
        bos_id=_token_id(part, "bos_token_id", 1 if kind == "spm" else None, len(pieces)),
        eos_id=_token_id(part, "eos_token_id", 2 if kind == "spm" else None, len(pieces)),
        add_bos=bool(part.value(_KEY + "add_bos_token", bpe_add_bos if kind == "bpe" else True)),
        add_eos=bool(part.value(_KEY + "add_eos_token", False)),
        add_space_prefix=bool(part.value(_KEY + "add_space_prefix", kind == "spm")),
        merge_ranks=_merge_ranks(part) if kind == "bpe" else {},
        pre_tokenizer=pre,
        extra_end_ids=tuple(token for token in (_token_id(part, key, None, len(pieces))
                                                for key in ("eot_token_id", "eom_token_id")) if token is not None),
        chat_template=part.value("tokenizer.chat_template"),
    )


def _list(part: GGUFPart, key: str, default: list[Any], length: int) -> list[Any]:
    values = part.value(_KEY + key, default)
    if not isinstance(values, list) or len(values) != length:
        raise TokenizerError(f"{part.path}: {_KEY}{key} has {len(values) if isinstance(values, list) else values!r} "
                             f"entries, the vocabulary {length} tokens")
    return values


def _token_id(part: GGUFPart, key: str, default: int | None, vocab_size: int) -> int | None:
    value = part.value(_KEY + key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size):
        raise TokenizerError(f"{part.path}: {_KEY}{key} is {value!r}, outside the vocabulary of {vocab_size} tokens")
    return value


def _merge_ranks(part: GGUFPart) -> dict[tuple[str, str], int]:
    merges = part.value(_KEY + "merges")
    if not isinstance(merges, list):
        raise TokenizerError(f"{part.path}: a gpt2 vocabulary needs {_KEY}merges")
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(merges):
        left, separator, right = str(merge).partition(" ")
        if not separator:
            raise TokenizerError(f"{part.path}: {_KEY}merges entry {rank} ({merge!r}) is not 'LEFT RIGHT'")
        ranks.setdefault((left, right), rank)
    return ranks
