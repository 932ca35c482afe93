"""`RemoteShards` (mer/router/remote_shards.py) over fake links: the shortest-queue choice with requests in
flight, failover of a silent shard (and its late answer dropped), the error without a replica, an
ErrorReply raised naming the shard. The real transport (shard-serve over CURVE tcp) is
tests/integration/test_remote_shards.py.

A fake shard answers each row with `row * (shard + 2)` (exact in float32 for these small integers), so a
test sees which shard computed what.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import structlog

from mer.cluster.shard_balance import uniform_map
from mer.errors import RemoteError, ShardUnavailableError
from mer.protocol import ErrorReply, ShardLayerRequest, ShardLayerResult
from mer.router.remote_shards import RemoteShards

D_MODEL = 4


class FakeLink:
    """A shard that answers when told to (`hold`), never (`silent`), or at once."""

    def __init__(self, shard: int):
        self.shard = shard
        self.endpoint = f"tcp://fake:{7000 + shard}"
        self.sent: list[ShardLayerRequest] = []
        self.replies: asyncio.Queue = asyncio.Queue()
        self.hold = False
        self.silent = False
        self.error = False
        self.held: list[ShardLayerRequest] = []
        self.closed = False

    async def send(self, request: ShardLayerRequest) -> None:
        self.sent.append(request)
        if self.silent:
            return
        if self.hold:
            self.held.append(request)
        else:
            self.answer(request)

    def answer(self, request: ShardLayerRequest) -> None:
        if self.error:
            self.replies.put_nowait(ErrorReply(request.request_id, "mer.errors.ShardExpertsError",
                                               f"shard {self.shard} does not serve them", ""))
        else:
            self.replies.put_nowait(ShardLayerResult(request.request_id, self.shard,
                                                     request.x * np.float32(self.shard + 2), 1.0))

    def release(self) -> None:
        for request in self.held:
            self.answer(request)
        self.held.clear()

    async def recv(self):
        return await self.replies.get()

    def close(self) -> None:
        self.closed = True


def rows(*values: float) -> np.ndarray:
    return np.array([[v] * D_MODEL for v in values], dtype=np.float32)


def make(replicas: int, deadline_s: float = 5.0):
    links = [FakeLink(0), FakeLink(1)]
    return RemoteShards(uniform_map(2, 4, 2, replicas), links, deadline_s=deadline_s), links


def test_each_expert_goes_to_the_replica_with_the_shortest_queue():
    async def scenario():
        shards, links = make(replicas=2)
        links[0].hold = links[1].hold = True
        first = asyncio.create_task(shards.run_layer(0, {1: rows(1)}))
        await asyncio.sleep(0.05)
        assert shards.queue_lengths() == [1, 0]  # tie -> the lowest shard id
        second = asyncio.create_task(shards.run_layer(0, {1: rows(2), 2: rows(3, 4)}))
        await asyncio.sleep(0.05)
        assert shards.queue_lengths() == [1, 1]  # both experts of the call to shard 1: one request
        assert [r.experts for r in links[1].sent] == [[1, 2]]
        third = asyncio.create_task(shards.run_layer(1, {0: rows(5)}))
        await asyncio.sleep(0.05)
        assert shards.queue_lengths() == [2, 1]  # tie again: shard 0
        links[1].release()
        assert np.array_equal((await second)[2], rows(3, 4) * 3)  # shard 1 computed it
        assert shards.queue_lengths() == [2, 0]
        fourth = asyncio.create_task(shards.run_layer(1, {3: rows(6)}))
        await asyncio.sleep(0.05)
        assert [r.experts for r in links[1].sent] == [[1, 2], [3]]  # shard 0 has 2 in flight, shard 1 none
        links[0].release()
        links[1].release()
        assert np.array_equal((await first)[1], rows(1) * 2)
        assert np.array_equal((await third)[0], rows(5) * 2)
        assert np.array_equal((await fourth)[3], rows(6) * 3)
        assert shards.queue_lengths() == [0, 0]
        await shards.close()
        assert all(link.closed for link in links)
    asyncio.run(scenario())


def test_a_silent_shard_fails_over_to_the_replica_and_its_late_answer_is_dropped():
    async def scenario():
        shards, links = make(replicas=2, deadline_s=0.2)
        links[0].hold = True
        with structlog.testing.capture_logs() as logs:
            out = await shards.run_layer(1, {0: rows(1), 3: rows(2, 3)})
            assert np.array_equal(out[0], rows(1) * 3) and np.array_equal(out[3], rows(2, 3) * 3)
            assert shards.down == {0: "no answer to request 0 within 0.2 s"}
            links[0].release()  # the late answer of request 0
            await asyncio.sleep(0.05)
            again = await shards.run_layer(0, {2: rows(7)})  # shard 0 is down: straight to shard 1
            assert np.array_equal(again[2], rows(7) * 3)
        failed = [e for e in logs if e["event"] == "shard_failed_over"]
        assert [(e["shard"], e["moe_layer"], e["experts"], e["request_id"]) for e in failed] == [(0, 1, [0, 3], 0)]
        assert failed[0]["reason"] == "no answer to request 0 within 0.2 s"
        dropped = [e for e in logs if e["event"] == "shard_late_answer_dropped"]
        assert [(e["shard"], e["request_id"]) for e in dropped] == [(0, 0)]
        assert [r.experts for r in links[1].sent] == [[0, 3], [2]]
        await shards.close()
    asyncio.run(scenario())


def test_without_a_replica_a_silent_shard_fails_the_call_naming_shard_and_experts():
    async def scenario():
        shards, links = make(replicas=1, deadline_s=0.2)
        links[1].silent = True
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError) as caught:
            await shards.run_layer(0, {0: rows(1), 1: rows(2), 3: rows(3)})  # 0 on shard 0; 1, 3 on shard 1
        assert time.monotonic() - started < 1.0
        assert caught.value.shard == 1 and caught.value.experts == (1, 3)
        assert "shard 1 (tcp://fake:7001) is down and layer 0 experts 1 (id 1), 3 (id 3) have no other live replica" \
            in str(caught.value)
        with pytest.raises(ShardUnavailableError, match=r"layer 1 experts 1 \(id 5\)"):  # known down: no wait
            await shards.run_layer(1, {1: rows(1)})
        assert np.array_equal((await shards.run_layer(1, {2: rows(4)}))[2], rows(4) * 2)  # shard 0 still serves
        await shards.close()
    asyncio.run(scenario())


def test_an_error_reply_is_raised_naming_the_shard():
    async def scenario():
        shards, links = make(replicas=1)
        links[1].error = True
        with pytest.raises(RemoteError, match=r"shard 1 \(tcp://fake:7001\): mer.errors.ShardExpertsError"):
            await shards.run_layer(0, {0: rows(1), 1: rows(2)})
        assert not shards.down  # an answer, not silence: no failover
        await shards.close()
    asyncio.run(scenario())
