#!/usr/bin/env python3
"""Learn the tiny model's merged pieces (`tools/tiny_moe_vocab.json`) from its training files.

    pip install -e '.[train]'                                  # tokenizers (and torch), development only
    python tools/train_tiny_vocab.py --pieces 3836 --out tools/tiny_moe_vocab.json

The vocabulary stays llama.cpp's SentencePiece ("llama") kind (`tools/tiny_moe_data.py`): the byte
tokens and U+2581 first, then these pieces, scored by their merge order so that the SentencePiece
merge loop (llama.cpp's and mer's) prefers the earliest. The pieces are learned by byte-pair
encoding (Hugging Face `tokenizers`' BPE trainer, used only here) over the training files with every
space written as U+2581, split into words that no piece may cross:

    U+2581* [^U+2581 \\n]+   a word with the spaces before it (indentation included)
    U+2581+                  spaces before a newline or the end of the text
    \\n+                     newlines

Because no piece crosses these boundaries, SentencePiece's merge loop over a whole text equals its
merge loop over each word, which is how `tiny_moe_data.encode` tokenizes the corpus quickly. A piece
is kept only if it has more than one character (single characters are the merge loop's starting
symbols; those without a piece fall back to byte tokens) and is spelled unlike every base token
(`<s>`, `<0x41>`, ...). The held-out files take no part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_data import BASE_TOKENS, SPACE_MARK, WORD_PATTERN, read_text, split_files  # noqa: E402


def learned_pieces(texts: list[str], count: int) -> list[str]:
    """The first `count` multi-character pieces of BPE merges over `texts`, in merge order."""
    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        raise SystemExit("tools/train_tiny_vocab.py needs Hugging Face tokenizers: pip install -e '.[train]'") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(WORD_PATTERN), behavior="isolated")
    # generous: the trainer's vocabulary also holds the single characters, which are dropped here
    trainer = trainers.BpeTrainer(vocab_size=count + 4096, show_progress=False, min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    pieces: list[str] = []
    seen: set[str] = set(BASE_TOKENS)  # a piece spelled like <s> or <0x41> would be ambiguous
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        piece = left + right
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
        if len(pieces) == count:
            return pieces
    raise SystemExit(f"the trainer learned only {len(pieces)} pieces, fewer than --pieces {count}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pieces", type=int, default=3836, help="merged pieces (vocabulary = 260 + pieces)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny_moe_vocab.json")
    args = parser.parse_args(argv)
    train_files, _ = split_files()
    texts = [read_text(path).replace(" ", SPACE_MARK) for path in train_files]
    pieces = learned_pieces(texts, args.pieces)
    args.out.write_text(json.dumps({"pieces": pieces}, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {len(pieces)} pieces to {args.out} from {len(train_files)} training files")


if __name__ == "__main__":
    main()
