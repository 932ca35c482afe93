"""What `mer-pipeline up`'s generation demos print: the prompt and its completion as one block on
stdout, then one summary line on stderr.

The block streams as the tokens come: the prompt first, then the completion. Whitespace at the end of
what has been printed so far (spaces, tabs, newlines) is held back until something else follows it,
so the whitespace the completion ends with (the blank and whitespace-only lines a small model
produces last, the spaces after its last word) is never printed and the block ends with exactly one
newline. The summary line gives the tokens generated, the decode speed, the decode steps' cache hit
rate, the MiB read from the store per decode step and the cache's size against the model's experts.
The detailed figures (prefill speed, per-block costs, each predictor's accuracy per layer) are
`mer-pipeline generate`'s two lines and `up --json`'s object.
"""

from __future__ import annotations

from typing import IO, Any

from mer.cli.generate_command import TextStream
from mer.model.tokenizer import Tokenizer


class BlockStream(TextStream):
    """`TextStream` that starts with the prompt and never prints the text's trailing whitespace."""

    def __init__(self, tokenizer: Tokenizer, prompt: str, stream: IO[str] | None = None):
        super().__init__(tokenizer, stream)
        self.pending = ""  # whitespace printed only once something other than whitespace follows it
        self.write(prompt)

    def write(self, text: str) -> None:
        text = self.pending + text
        shown = text.rstrip()
        self.pending = text[len(shown):]
        super().write(shown)


def summary_line(summary: dict[str, Any], *, cache_slots: int, num_experts: int) -> str:
    """`32 tokens: decode 51.0 tok/s, hit rate 80.6%, 0.04 MiB read per token, cache 16 of 32 experts`."""
    return (f"{len(summary['tokens'])} tokens: decode {summary['decode_tps']:.1f} tok/s, hit rate "
            f"{summary['decode_hit_rate_pct']:.1f}%, {summary['mib_read_per_token']:.2f} MiB read per token, "
            f"cache {cache_slots} of {num_experts} experts")
