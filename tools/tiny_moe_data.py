"""Vocabulary and training data of the tiny MoE model (`tools/train_tiny_moe.py`); no torch needed.

The vocabulary is llama.cpp's SentencePiece ("llama") kind, so that llama.cpp and mer give the same
ids for any text:

    0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3..258 the byte tokens <0x00>..<0xFF>, 259 "\u2581",
    260.. the merged pieces of `tools/tiny_moe_vocab.json` (learned by `tools/train_tiny_vocab.py`)

with `tokenizer.ggml.add_space_prefix = false`. llama.cpp's SentencePiece path rewrites every space
as U+2581, starts from the text's characters and repeatedly merges the adjacent pair whose
concatenation is a piece with the best score (here: the earliest learned, score -rank), leftmost on
ties; a symbol left without a piece falls back to its UTF-8 byte tokens. No piece crosses the word
boundaries of `WORD_PATTERN` (the pieces were learned inside words), so the merge loop over a whole
text equals the loop over each word, and `encode` tokenizes each distinct word once
(`mer.model.tokenizer_algorithms.spm_tokenize`, mer's implementation of llama.cpp's loop).

Training data: the `.py` files of the running Python's standard library
(`sysconfig.get_paths()["stdlib"]`, no site-packages), each as BOS + ids + EOS, split by file path:
a file is held out when crc32 of its relative path is 0 modulo `HELD_OUT_MODULUS`.
"""

from __future__ import annotations

import functools
import json
import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import regex

from mer.model.tokenizer_algorithms import spm_tokenize

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
SPACE_MARK = "\u2581"
SPACE_ID = BYTE_OFFSET + 256
FIRST_PIECE_ID = SPACE_ID + 1
HELD_OUT_MODULUS = 20  # ~5% of the files
VOCAB_PATH = Path(__file__).resolve().parent / "tiny_moe_vocab.json"
# a word with the spaces before it; spaces before a newline or the end; newlines (U+2581 = a space)
WORD_PATTERN = "\u2581*[^\u2581\n]+|\u2581+|\n+"
BASE_TOKENS = ("<unk>", "<s>", "</s>", *(f"<0x{value:02X}>" for value in range(256)), SPACE_MARK)


@functools.cache
def learned_pieces() -> tuple[str, ...]:
    """The merged pieces of `tools/tiny_moe_vocab.json`, in learning order."""
    try:
        pieces = json.loads(VOCAB_PATH.read_text(encoding="utf-8"))["pieces"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"{VOCAB_PATH}: cannot read the tiny model's pieces ({error}); "
                         "python tools/train_tiny_vocab.py writes them") from None
    clash = sorted(set(pieces) & set(BASE_TOKENS)) or sorted({p for p in pieces if pieces.count(p) > 1})[:3]
    if clash or any(len(piece) < 2 for piece in pieces):
        raise SystemExit(f"{VOCAB_PATH}: pieces must be distinct, longer than one character and unlike the base "
                         f"tokens (found {clash or [p for p in pieces if len(p) < 2][:3]})")
    return tuple(pieces)


def token_strings() -> list[str]:
    """The vocabulary's pieces in id order."""
    return [*BASE_TOKENS, *learned_pieces()]


@functools.cache
def token_scores() -> tuple[float, ...]:
    """SentencePiece scores: 0 for the base tokens, -rank for the learned pieces (earliest merges first)."""
    return (0.0,) * len(BASE_TOKENS) + tuple(-float(rank) for rank in range(len(learned_pieces())))


def __getattr__(name: str) -> int:
    """`VOCAB_SIZE`, read from the vocabulary file on first use (so `train_tiny_vocab.py` can write it)."""
    if name == "VOCAB_SIZE":
        return len(BASE_TOKENS) + len(learned_pieces())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _piece_ids() -> dict[str, int]:
    return {piece: token for token, piece in enumerate(token_strings()) if token >= SPACE_ID}


@functools.lru_cache(maxsize=1 << 20)
def _word_ids(word: str) -> tuple[int, ...]:
    return tuple(spm_tokenize(word, _piece_ids(), token_scores(), lambda value: BYTE_OFFSET + value))


def encode(text: str) -> np.ndarray:
    """The ids llama.cpp and mer give `text` with this vocabulary (no BOS/EOS), as uint16."""
    ids: list[int] = []
    for word in regex.findall(WORD_PATTERN, text.replace(" ", SPACE_MARK)):
        ids.extend(_word_ids(word))
    return np.array(ids, dtype=np.uint16)


@functools.cache
def token_byte_strings() -> tuple[bytes, ...]:
    """The bytes of text each id stands for (BOS / EOS / unknown: none; U+2581: a space)."""
    return tuple(b"" if token < BYTE_OFFSET else bytes([token - BYTE_OFFSET]) if token < SPACE_ID
                 else piece.replace(SPACE_MARK, " ").encode() for token, piece in enumerate(token_strings()))


def token_byte_counts() -> np.ndarray:
    """How many bytes of text each id stands for (`token_byte_strings`), int64 [VOCAB_SIZE]."""
    return np.array([len(data) for data in token_byte_strings()], np.int64)


def decode(ids: Iterable[int]) -> str:
    """Text of `ids` (BOS/EOS/unknown dropped, bytes joined, invalid UTF-8 replaced)."""
    strings = token_byte_strings()
    return b"".join(strings[token] for token in ids).decode("utf-8", "replace")


def stdlib_root() -> Path:
    """The standard library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every `.py` file of the standard library (site-/dist-packages excluded), sorted by relative path."""
    root = root or stdlib_root()
    files = [path for path in root.rglob("*.py")
             if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts) and path.is_file()]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def is_held_out(relative_path: str) -> bool:
    """Whether the file at `relative_path` (posix, relative to the stdlib root) is held out."""
    return zlib.crc32(relative_path.encode()) % HELD_OUT_MODULUS == 0


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files)."""
    root = root or stdlib_root()
    train, held_out = [], []
    for path in stdlib_files(root):
        (held_out if is_held_out(path.relative_to(root).as_posix()) else train).append(path)
    return train, held_out


def read_text(path: Path) -> str:
    """A source file's text (undecodable bytes replaced, as a few test files have them)."""
    return path.read_bytes().decode("utf-8", "replace")


def corpus_ids(files: Iterable[Path]) -> np.ndarray:
    """BOS + ids + EOS of every file, concatenated (uint16)."""
    arrays = []
    for path in files:
        arrays += [np.array([BOS_ID], np.uint16), encode(read_text(path)), np.array([EOS_ID], np.uint16)]
    return np.concatenate(arrays)


def held_out_windows(count: int, length: int, root: Path | None = None) -> np.ndarray:
    """`count` fixed windows of `length` ids [count, length], evenly spaced over the held-out corpus."""
    data = corpus_ids(split_files(root)[1])
    starts = np.linspace(0, len(data) - length - 1, count).astype(np.int64)
    return np.stack([data[start : start + length] for start in starts]).astype(np.int64)


def unigram_log2_probabilities(files: Iterable[Path]) -> np.ndarray:
    """log2 probability of every id under a unigram model of `files` (add-one smoothed counts)."""
    counts = np.bincount(corpus_ids(files), minlength=len(token_strings())).astype(np.float64) + 1.0
    return np.log2(counts / counts.sum())
