"""The I/O worker's statistics do not grow with the run: `IoStats` carries aggregates (counters and a
fixed latency histogram, and a snapshot of the slots: one expert id per slot), never one record per read.

Two `mer-pipeline run`s of the tiny store with few slots (so most lookups read), 200 and 2,000 tokens
with prefetch on (the preadv backend: the message's size does not depend on it): the I/O worker logs the encoded size of every `IoStats` it sends (`io_stats_sent`).
Bound: msgpack writes an integer in 1 to 9 bytes by its value, so a counter can only widen by 8
bytes; with `MAX_INTEGERS` integers in the message, the final stats of the long run are at most
8 x MAX_INTEGERS bytes larger than those of the short one, and at most `MAX_NBYTES` in all, however
many reads there were (one record per read, as before, would take ~150 bytes per read).
"""

from __future__ import annotations

import pytest

from mer.metrics.stats import NUM_LATENCY_BUCKETS
from tests.support.pipeline_runs import run_pipeline

pytestmark = pytest.mark.slow  # starts the process graph

CACHE_SLOTS = 3
# the latency buckets; three read counters of 2; six prefetch counters; 11 counters and a list per predictor;
# the expert of each slot of the arena (the cache and the prefetch reserve of 2), pinned slots and queue depth
MAX_INTEGERS = NUM_LATENCY_BUCKETS + 6 + 6 + 4 * 11 + (CACHE_SLOTS + 2) + 2
MAX_NBYTES = 9 * MAX_INTEGERS + 1024  # every integer at its widest, plus names, floats and framing


def final_io_stats(leak_guard, store, tokens: int, workdir) -> dict:
    workdir.mkdir()
    run = run_pipeline(leak_guard, store, "--tokens", tokens, "--cache-slots", CACHE_SLOTS, "--compute-workers", 1,
                       "--workload", "markov", "--seed", 5, "--io-backend", "preadv",  # the size is the backend's
                       workdir=workdir).check_ok()
    sent = run.events_named("io_stats_sent")
    assert len(sent) == 2  # the router asks at the start and at the end
    assert sent[-1]["reads"] == run.events_named("prefetch_stats")[-1]["reads_counted"] == run.summary["reads"]
    return sent[-1]


@pytest.mark.heavy
@pytest.mark.slow
def test_io_stats_do_not_grow_with_the_run(leak_guard, pipeline_stores, tmp_path):
    short = final_io_stats(leak_guard, pipeline_stores["tiny"], 200, tmp_path / "short")
    long = final_io_stats(leak_guard, pipeline_stores["tiny"], 2000, tmp_path / "long")
    print(f"IoStats: {short['nbytes']} bytes after {short['reads']} reads, {long['nbytes']} after {long['reads']}")
    assert long["reads"] >= 5 * short["reads"] > 0
    assert long["nbytes"] <= short["nbytes"] + 8 * MAX_INTEGERS
    assert short["nbytes"] <= long["nbytes"] <= MAX_NBYTES
