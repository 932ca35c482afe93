"""When each expert is next requested, over a request sequence known in advance (for Belady's MIN).

The sequence is a list of steps; a step is the set of experts requested together (the k experts of
one routing decision). The index walks the sequence as the replay does: `advance(expert_ids)`
moves to the next step and checks that it is the one the index was built from, so an offline
policy can never silently look at the wrong future. `next_use(expert)` is the index of the first
step after the current one that requests `expert`, or `never` (= the number of steps) if none does.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence


class NextUseIndex:
    """Next-use positions of every expert in a fixed sequence of steps, with a cursor on the current step."""

    def __init__(self, steps: Sequence[Sequence[int]]):
        self._steps = [frozenset(step) for step in steps]
        self._uses: dict[int, list[int]] = {}
        for index, step in enumerate(steps):
            for expert in step:
                self._uses.setdefault(expert, []).append(index)
        self.current_step = -1  # no step requested yet

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    @property
    def never(self) -> int:
        """The position `next_use` returns for an expert that is not requested again."""
        return len(self._steps)

    def advance(self, expert_ids: Sequence[int]) -> None:
        """Move to the next step; ValueError unless it requests exactly `expert_ids`."""
        position = self.current_step + 1
        if position >= len(self._steps):
            raise ValueError(f"request {list(expert_ids)} after the last of the {len(self._steps)} known steps")
        if frozenset(expert_ids) != self._steps[position]:
            raise ValueError(
                f"step {position} requests {sorted(expert_ids)}, the known sequence has {sorted(self._steps[position])}"
            )
        self.current_step = position

    def next_use(self, expert_id: int) -> int:
        """The first step after the current one that requests `expert_id`, or `never`."""
        uses = self._uses.get(expert_id)
        if not uses:
            return self.never
        position = bisect_right(uses, self.current_step)
        return uses[position] if position < len(uses) else self.never
