"""The serving job's sequences: what each one holds, the bounded KV pool, and the running batch.

A `ServedSequence` is one request in the router: its prompt, sampler and stop rules (those of
`mer.model.generate`: `max_tokens`, an end id unless `ignore_eos`, a full KV cache), its own KV cache
once admitted, and the tokens it feeds a step (`next_tokens`: its prompt in chunks of `prefill_chunk`
tokens, the same chunks `mer-pipeline generate` runs, then its last token).

`KVPool` counts KV positions: a sequence takes `capacity` positions (its prompt plus `max_tokens`,
at most the model's context and the pool) when admitted and gives them back when it ends, so the
KV memory of the served sequences never exceeds the pool (`kv_positions`, counted by the RAM budget).

`ServingBatch` holds the waiting queue (first come, first served: the head waits until the pool and
`max_sequences` let it in, nobody overtakes it) and the running sequences. Requests join and leave
only between steps (`admit`, `finish`); a cancelled sequence leaves at the next step boundary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mer.model.attention import KVCache
from mer.model.generate import STOP_CONTEXT, STOP_END_OF_GENERATION, STOP_MAX_TOKENS
from mer.model.sampling import Sampler

STOP_CANCELLED = "cancelled"


@dataclass
class ServedSequence:
    """One served request in the router (see the module docstring)."""

    request_id: int
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    end_ids: frozenset[int]
    ignore_eos: bool
    logprobs: int
    capacity: int  # KV positions it takes: min(prompt + max_tokens, context, pool)
    kv_cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already run
    cancel_reason: str = ""

    @property
    def is_prefill(self) -> bool:
        return self.prefilled < len(self.prompt)

    def next_tokens(self, prefill_chunk: int) -> list[int]:
        """What the sequence's next step runs: the next chunk of its prompt, or its last token."""
        if self.is_prefill:
            return self.prompt[self.prefilled : self.prefilled + prefill_chunk]
        return self.tokens[-1:]

    def ran(self, count: int) -> bool:
        """A step ran `count` of its tokens; True when it now has logits to sample from (the prompt is done)."""
        if self.is_prefill:
            self.prefilled += count
        return not self.is_prefill

    def accept(self, token: int) -> str | None:
        """Take the chosen token; the stop reason if the sequence is done (generate's rules), else None."""
        self.tokens.append(token)
        if token in self.end_ids and not self.ignore_eos:
            return STOP_END_OF_GENERATION
        if len(self.tokens) >= self.max_tokens:
            return STOP_MAX_TOKENS
        assert self.kv_cache is not None
        if self.kv_cache.length >= self.kv_cache.capacity:
            return STOP_CONTEXT
        return None


class KVPool:
    """KV positions handed to sequences; never more than `num_positions` at once."""

    def __init__(self, num_positions: int):
        self.num_positions = num_positions
        self.num_used = 0

    def can_allocate(self, positions: int) -> bool:
        return self.num_used + positions <= self.num_positions

    def allocate(self, positions: int) -> None:
        if not self.can_allocate(positions):
            raise RuntimeError(f"KV pool: {positions} positions asked, {self.num_positions - self.num_used} free")
        self.num_used += positions

    def deallocate(self, positions: int) -> None:
        self.num_used -= positions


class ServingBatch:
    """The waiting queue and the running sequences (see the module docstring)."""

    def __init__(self, max_sequences: int, pool: KVPool, new_kv_cache):
        self.max_sequences = max_sequences
        self.pool = pool
        self.new_kv_cache = new_kv_cache  # capacity -> KVCache
        self.waiting: deque[ServedSequence] = deque()
        self.running: dict[int, ServedSequence] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def is_idle(self) -> bool:
        return not self.waiting and not self.running

    def submit(self, sequence: ServedSequence) -> None:
        self.waiting.append(sequence)

    def cancel(self, request_id: int, reason: str) -> ServedSequence | None:
        """Mark a running sequence to leave at the next step; remove a waiting one at once (returned)."""
        if request_id in self.running:
            self.running[request_id].cancel_reason = reason
            return None
        for sequence in self.waiting:
            if sequence.request_id == request_id:
                self.waiting.remove(sequence)
                sequence.cancel_reason = reason
                return sequence
        return None

    def admit(self) -> list[ServedSequence]:
        """Move waiting sequences in, first come first served, while `max_sequences` and the pool allow."""
        admitted = []
        while self.waiting and len(self.running) < self.max_sequences and self.pool.can_allocate(self.waiting[0].capacity):
            sequence = self.waiting.popleft()
            self.pool.allocate(sequence.capacity)
            sequence.kv_cache = self.new_kv_cache(sequence.capacity)
            self.running[sequence.request_id] = sequence
            admitted.append(sequence)
        return admitted

    def plan_step(self, prefill_chunk: int) -> list[tuple[ServedSequence, list[int]]]:
        """The next step's sequences and their tokens: every decoding sequence, and prompt chunks in admission
        order while their tokens fit in `prefill_chunk` (at least one chunk)."""
        planned, budget = [], prefill_chunk
        for sequence in self.running.values():
            tokens = sequence.next_tokens(prefill_chunk)
            if sequence.is_prefill:
                if len(tokens) > budget:
                    continue
                budget -= len(tokens)
            planned.append((sequence, tokens))
        return planned

    def cancelled(self) -> list[ServedSequence]:
        return [sequence for sequence in self.running.values() if sequence.cancel_reason]

    def finish(self, sequence: ServedSequence) -> None:
        """The sequence leaves the batch; its KV positions go back to the pool."""
        if self.running.pop(sequence.request_id, None) is not None:
            self.pool.deallocate(sequence.capacity)
            sequence.kv_cache = None
