"""Generated tokens to text as they come, with OpenAI's stop strings.

Text is decoded incrementally as UTF-8 (a character split over tokens waits for its last byte, as
`mer-pipeline generate` prints it). With stop strings, text that could still be the start of a stop
string is held back; when one appears, the text before it is the last emitted and the sequence is
stopped (its tail, and the stop string itself, are never sent).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from mer.model.tokenizer import Tokenizer


class CompletionText:
    """One completion's text, token by token (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [text for text in stop if text]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.stopped = False  # a stop string matched: nothing more is emitted

    def add(self, token: int) -> str:
        """The text that can be emitted after this token ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self.held += self.decoder.decode(self.tokenizer.token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once the sequence ended."""
        if self.stopped:
            return ""
        self.held += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        found = [index for index in (self.held.find(text) for text in self.stop) if index >= 0]
        if found:
            text, self.held, self.stopped = self.held[: min(found)], "", True
            return text
        keep = 0 if final else self._partial_stop_length()
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text

    def _partial_stop_length(self) -> int:
        """The longest end of the held text that begins some stop string."""
        longest = 0
        for text in self.stop:
            for length in range(min(len(text) - 1, len(self.held)), longest, -1):
                if self.held.endswith(text[:length]):
                    longest = length
                    break
        return longest
