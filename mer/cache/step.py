"""The order in which the experts of one step (one routing decision) are acquired.

The k experts of a step are requested together and must not evict each other: each is leased
for the whole step and released when it ends, and a miss may evict any READY slot, including one
holding an expert of the same step that has not been acquired yet. Acquiring the experts already in
a slot (READY, LEASED or LOADING) first leases all of them before the first miss looks for a
victim, so a miss can only evict experts outside the step. With `cache_slots >= k` a victim
outside the step always exists unless the step's experts fill the cache, and then there is no miss.

Both the live I/O worker and the offline simulator acquire in this order, so they agree exactly.
"""

from __future__ import annotations

from typing import Sequence

from mer.cache.slot_table import SlotTable


def acquire_order(table: SlotTable, expert_ids: Sequence[int]) -> list[int]:
    """Indices into `expert_ids`: those with a slot first, then the others, each group in request order."""
    resident = [index for index, expert in enumerate(expert_ids) if table.lookup(expert) is not None]
    missing = [index for index, expert in enumerate(expert_ids) if table.lookup(expert) is None]
    return resident + missing
