"""Vocabulary and training data of the tiny MoE model (`tools/train_tiny_moe.py`); no torch needed.

The vocabulary is llama.cpp's SentencePiece ("llama") kind reduced to bytes, so that llama.cpp and mer
give the same ids for any text:

    0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3..258 the byte tokens <0x00>..<0xFF>, 259 "\u2581"

with `tokenizer.ggml.add_space_prefix = false`. llama.cpp's SentencePiece path first rewrites every
space as U+2581; the one normal piece "\u2581" takes it (so a space is one token and decodes back to a
space), and every other character, having no piece of its own, falls back to its UTF-8 bytes. No two
pieces can merge, so the ids are simply: U+2581 and " " -> 259, any other byte b -> 3 + b. (The byte
token <0x20> is never produced, and a literal U+2581 in a text decodes as a space.)

Training data: the `.py` files of the running Python's standard library
(`sysconfig.get_paths()["stdlib"]`, no site-packages), each as BOS + ids + EOS, split by file path:
a file is held out when crc32 of its relative path is 0 modulo `HELD_OUT_MODULUS`.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
SPACE_MARK = "\u2581"
SPACE_ID = BYTE_OFFSET + 256
VOCAB_SIZE = SPACE_ID + 1
HELD_OUT_MODULUS = 20  # ~5% of the files

_SPACE_MARK_BYTES = SPACE_MARK.encode()
# byte -> id, with a placeholder (255 + 1 never occurs) for the space mark handled separately
_BYTE_IDS = np.arange(BYTE_OFFSET, BYTE_OFFSET + 256, dtype=np.uint16)
_BYTE_IDS[ord(" ")] = SPACE_ID


def token_strings() -> list[str]:
    """The vocabulary's pieces in id order."""
    return ["<unk>", "<s>", "</s>", *(f"<0x{value:02X}>" for value in range(256)), SPACE_MARK]


def encode(text: str) -> np.ndarray:
    """The ids llama.cpp and mer give `text` with this vocabulary (no BOS/EOS), as uint16."""
    pieces = text.split(SPACE_MARK)
    arrays: list[np.ndarray] = []
    for index, piece in enumerate(pieces):
        if index:
            arrays.append(np.array([SPACE_ID], dtype=np.uint16))
        arrays.append(_BYTE_IDS[np.frombuffer(piece.encode("utf-8", "surrogatepass"), dtype=np.uint8)])
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


def decode(ids: Iterable[int]) -> str:
    """Text of `ids` (BOS/EOS/unknown dropped, bytes joined, invalid UTF-8 replaced)."""
    data = bytearray()
    for token in ids:
        if token == SPACE_ID:
            data += b" "
        elif BYTE_OFFSET <= token < SPACE_ID:
            data.append(token - BYTE_OFFSET)
    return data.decode("utf-8", "replace")


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
    counts = np.bincount(corpus_ids(files), minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    return np.log2(counts / counts.sum())
