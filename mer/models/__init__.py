"""Models shipped inside the package: the tiny trained MoE (`tiny-moe-q8_0.gguf`, see docs/tiny-model.md)
and the held-out text `mer-pipeline perplexity` scores it on by default (`tiny-moe-held-out.txt`: six
Python standard library files its training held out, PSF-2.0; written by tools/write_held_out_text.py)."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_NAME = "tiny-moe-q8_0.gguf"
HELD_OUT_TEXT_NAME = "tiny-moe-held-out.txt"


def tiny_model_path() -> Path:
    """Path of the shipped tiny MoE GGUF (arch llama, 6 blocks, 8 experts top-2, a learned 4096-piece vocabulary)."""
    return Path(__file__).resolve().parent / TINY_MODEL_NAME


def held_out_text_path() -> Path:
    """Path of the shipped held-out text of the tiny model (never seen in its training)."""
    return Path(__file__).resolve().parent / HELD_OUT_TEXT_NAME
