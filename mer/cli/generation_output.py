"""What `mer-pipeline generate` prints: streamed text, the timing and experts lines, the `--json` result."""

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


def experts_line(summary: dict[str, Any]) -> str:
    """One line: how the expert lookups were served, and each predictor's accuracy (the gate's per layer)."""
    line = (f"experts: {summary['lookups']} lookups, {summary['hits']} hits, {summary['prefetch_joins']} joined a "
            f"prefetch read, {summary['demand_misses']} demand misses")
    for name, entry in summary.get("predictors", {}).items():
        line += (f"; {name}: top-1 {entry['top1_accuracy_pct']:.1f}%, top-k {entry['topk_accuracy_pct']:.1f}%, "
                 f"{entry['used']}/{entry['issued']} prefetches used")
        layers = [f"layer {layer['layer']}" + (f" ({layer['ahead']} ahead)" if layer["ahead"] > 1 else "")
                  + f" {layer['topk_accuracy_pct']:.1f}/{layer['top1_accuracy_pct']:.1f}%"
                  for layer in entry.get("per_layer", [])]
        if layers:
            line += f" (per layer top-k/top-1: {', '.join(layers)})"
    return line


def json_result(summary: dict[str, Any], tokenizer: Tokenizer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `--json` object: the run summary plus `text` (the completion only)."""
    return {**summary, "text": tokenizer.decode(list(summary["tokens"])), **(extra or {})}
