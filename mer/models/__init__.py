"""Models shipped inside the package: the tiny trained MoE (`tiny-moe-q8_0.gguf`, see docs/tiny-model.md)."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_NAME = "tiny-moe-q8_0.gguf"


def tiny_model_path() -> Path:
    """Path of the shipped tiny MoE GGUF (arch llama, 4 blocks, 8 experts top-2, byte-level vocabulary)."""
    return Path(__file__).resolve().parent / TINY_MODEL_NAME
