"""The two subword algorithms of GGUF vocabularies, as llama.cpp runs them.

- SentencePiece-style (`tokenizer.ggml.model = "llama"`): the text (spaces already replaced by
  U+2581) starts as single characters; repeatedly the adjacent pair whose concatenation is a
  vocabulary piece with the highest score is merged (ties: the leftmost pair). A final symbol
  that is not a piece becomes its UTF-8 bytes as `<0xXX>` byte tokens (byte fallback).
- GPT-2-style byte-level BPE (`"gpt2"`): the text is split into words by the pre-tokenizer's
  regular expressions (applied one after the other, each splitting the previous pieces into
  matches and the text between them), each word's UTF-8 bytes are mapped to GPT-2's printable
  byte alphabet, and the adjacent pair with the lowest merge rank is merged until none is left
  (ties: the leftmost pair).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence

import regex

from mer.errors import TokenizerError

# Pre-tokenizer expressions by `tokenizer.ggml.pre`, as llama.cpp's llm_tokenizer_bpe uses them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# o200k (gpt-4o, gpt-oss), as llama.cpp writes it: an upper-case-ish run is "a letter but not a-z", a
# lower-case-ish run "a letter but not A-Z" (tokenizer.json's \p{Lu}/\p{Ll} classes, rewritten by llama.cpp).
_NOT_LOWER, _NOT_UPPER = r"(?:(?=[\p{L}])[^a-z])", r"(?:(?=[\p{L}])[^A-Z])"
_O200K = (rf"[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}*{_NOT_UPPER}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}+{_NOT_UPPER}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
# DeepSeek LLM (V2, V2-Lite) and V3 (V3, R1), as llama.cpp writes them (explicit letter ranges; `\Z` for
# the ECMAScript `$`, which matches only at the end of the text).
_DEEPSEEK_LETTERS = ("A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370"
                     "-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-"
                     "\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-"
                     "\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-"
                     "\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
                     "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a"
                     "-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-"
                     "\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-"
                     "\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-"
                     "\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
                     "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_LLM = ("[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                 r"\s+\Z", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}+")
_DEEPSEEK_V3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (expressions, ignore_merges, add_bos default)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    "gpt-2": ((_GPT2,), False, False),
    "olmo": ((_GPT2,), False, False),
    "mpt": ((_GPT2,), False, False),
    "qwen2": ((_QWEN2,), False, False),
    "deepseek-r1-qwen": ((_QWEN2,), False, False),
    "stablelm2": ((_QWEN2,), False, False),
    "llama3": ((_LLAMA3,), True, True),
    "llama-v3": ((_LLAMA3,), True, True),
    "llama-bpe": ((_LLAMA3,), True, True),
    "dbrx": ((_LLAMA3,), False, False),
    "smaug-bpe": ((_LLAMA3,), False, False),
    "glm4": ((_LLAMA3,), False, False),  # GLM-4.5 (llama.cpp's CHATGLM4: llama3's expression, merges kept)
    "chatglm-bpe": ((_LLAMA3,), False, False),
    "gpt-4o": ((_O200K,), False, False),
    "deepseek-llm": (_DEEPSEEK_LLM, False, False),
    "deepseek-v3": (_DEEPSEEK_V3, False, False),
}


def byte_level_table() -> list[str]:
    """GPT-2's byte -> printable character table (bytes that print stand for themselves)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    table, extra = [], 0
    for value in range(256):
        if value in printable:
            table.append(chr(value))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


BYTE_TO_CHARACTER = byte_level_table()
CHARACTER_TO_BYTE = {character: value for value, character in enumerate(BYTE_TO_CHARACTER)}


def compile_pre_tokenizer(name: str) -> tuple[list[regex.Pattern], bool, bool]:
    """(compiled expressions, ignore_merges, add_bos default) of a `tokenizer.ggml.pre` name."""
    if name not in PRE_TOKENIZERS:
        raise TokenizerError(f"pre-tokenizer {name!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")
    expressions, ignore_merges, add_bos = PRE_TOKENIZERS[name]
    return [regex.compile(expression) for expression in expressions], ignore_merges, add_bos


def split_words(text: str, expressions: Sequence[regex.Pattern]) -> list[str]:
    """Apply each expression in turn: every piece splits into its matches and the text between."""
    pieces = [text] if text else []
    for expression in expressions:
        split: list[str] = []
        for piece in pieces:
            start = 0
            for match in expression.finditer(piece):
                if match.start() > start:
                    split.append(piece[start : match.start()])
                if match.end() > match.start():
                    split.append(match.group())
                start = max(start, match.end())
            if start < len(piece):
                split.append(piece[start:])
        pieces = split
    return pieces


def _merge_loop(symbols: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge adjacent symbols, best (lowest) priority first, leftmost on ties, until none applies."""
    alive = [True] * len(symbols)
    following = list(range(1, len(symbols))) + [-1]
    preceding = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            rank = priority(symbols[left], symbols[right])
            if rank is not None:
                heapq.heappush(queue, (rank, left, right, symbols[left] + symbols[right]))

    for index in range(len(symbols) - 1):
        push(index, index + 1)
    while queue:
        _, left, right, text = heapq.heappop(queue)
        if not (alive[left] and alive[right]) or following[left] != right or symbols[left] + symbols[right] != text:
            continue
        symbols[left], alive[right] = text, False
        following[left] = following[right]
        if following[right] >= 0:
            preceding[following[right]] = left
        push(preceding[left], left)
        push(left, following[left])
    return [symbol for symbol, is_alive in zip(symbols, alive) if is_alive]


def spm_tokenize(
    text: str, piece_ids: Mapping[str, int], scores: Sequence[float], byte_token: Callable[[int], int]
) -> list[int]:
    """SentencePiece-style tokens of `text` (whitespace already escaped to U+2581)."""
    def priority(left: str, right: str) -> float | None:
        token = piece_ids.get(left + right)
        return None if token is None else -scores[token]

    tokens: list[int] = []
    for symbol in _merge_loop(list(text), priority):
        token = piece_ids.get(symbol)
        if token is not None:
            tokens.append(token)
        else:
            tokens.extend(byte_token(value) for value in symbol.encode("utf-8"))
    return tokens


def bpe_tokenize_word(word: str, piece_ids: Mapping[str, int], merge_ranks: Mapping[tuple[str, str], int],
                      ignore_merges: bool) -> list[int]:
    """Byte-level BPE tokens of one pre-tokenized word (already in GPT-2's byte alphabet)."""
    if ignore_merges and word in piece_ids:
        return [piece_ids[word]]
    symbols = _merge_loop(list(word), lambda left, right: merge_ranks.get((left, right)))
    tokens: list[int] = []
    for symbol in symbols:
        if symbol in piece_ids:
            tokens.append(piece_ids[symbol])
        else:
            tokens.extend(piece_ids[character] for character in symbol if character in piece_ids)
    return tokens


def to_byte_level(text: str) -> str:
    """`text`'s UTF-8 bytes written in GPT-2's byte alphabet."""
    return "".join(BYTE_TO_CHARACTER[value] for value in text.encode("utf-8"))


def from_byte_level(piece: str) -> bytes:
    """The bytes a byte-level piece stands for (characters outside the alphabet as UTF-8)."""
    out = bytearray()
    for character in piece:
        value = CHARACTER_TO_BYTE.get(character)
        out.extend(character.encode("utf-8") if value is None else bytes((value,)))
    return bytes(out)
