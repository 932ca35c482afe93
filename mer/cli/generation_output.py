"""What `mer-pipeline generate` prints: streamed text, the timing line, the `--json` result."""

from __future__ import annotations

import codecs
import sys
from typing import IO, Any

from mer.model.tokenizer import Tokenizer


class TextStream:
    """Prints generated tokens' text as it comes; a character split over tokens waits for its last byte."""

    def __init__(self, tokenizer: Tokenizer, stream: IO[str] | None = None):
        self.tokenizer = tokenizer
        self.stream = stream or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, index: int, token: int) -> None:
        text = self.decoder.decode(self.tokenizer.token_bytes(token))
        if text:
            self.stream.write(text)
            self.stream.flush()

    def finish(self) -> None:
        self.stream.write(self.decoder.decode(b"", final=True) + "\n")
        self.stream.flush()


def timing_line(summary: dict[str, Any]) -> str:
    """One line: prefill and decode speed, hit rate, MiB read per token, per-block costs, stop reason."""
    prompt, steps = len(summary["prompt_tokens"]), summary["decode_steps"]
    return (f"prefill {prompt} tokens {summary['prefill_tps']:.1f} tok/s, decode {steps} steps "
            f"{summary['decode_tps']:.1f} tok/s, hit rate {summary['hit_rate_pct']:.1f}%, "
            f"{summary['mib_read_per_token']:.2f} MiB read per token; per MoE block: dense "
            f"{summary['dense_us_per_block']:.0f} us, experts {summary['expert_us_per_block']:.0f} us; "
            f"{len(summary['tokens'])} tokens, stop: {summary['stop_reason']}")


def json_result(summary: dict[str, Any], tokenizer: Tokenizer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `--json` object: the run summary plus `text` (the completion only)."""
    return {**summary, "text": tokenizer.decode(list(summary["tokens"])), **(extra or {})}
