"""The router's side of a cluster (docs/scale-out.md): one MoE layer's experts computed on remote shard groups.

`RemoteShards(shard_map, links)` holds one link per shard (`RemoteShards.connect` makes CURVE client
DEALERs to the shard groups' `tcp://HOST:PORT` endpoints, `mer.cluster.shard_link`). `run_layer(layer,
batches)` takes `{expert: rows}` (ids within the layer, float32 rows `[n, d_model]`) and returns
`{expert: outputs}` (each row's expert output, not gate-weighted, float32):

- each expert goes to the replica with the shortest queue (`ShardMap.choose_replica`; a shard's queue is
  the requests in flight to it when the call plans; shards marked down are never chosen), one
  `ShardLayerRequest` per shard with work, all sent at once, in the wire precision (`f32`, bit-exact, or
  `f16`); the results are checked against their requests (id, shape, dtype) and widened to float32;
- a shard that does not answer a request within `deadline_s` is marked down (for the life of this
  object) and its experts are sent again, to their other replicas (`shard_failed_over`); if one of them
  has no live replica left, the call raises `ShardUnavailableError` naming the shard and the experts
  (`shard_unavailable`): never zeros, never a partial answer. Each round of a call waits at most
  `deadline_s`, so a call with one failover takes at most about twice that;
- an answer that comes after its request was given up (a shard already failed over) is dropped by its
  request id (`shard_late_answer_dropped`); request ids are never reused;
- an `ErrorReply` from a shard (it does not serve an expert, an expert failed there) raises `RemoteError`
  whose origin names the shard and its endpoint; a malformed reply fails the shard's requests in flight
  with a `ProtocolError` naming the shard. Neither fails over: they are answers, not silence.

Each shard's traffic is counted in `stats` (`ShardLinkStats`). The jobs reach it through
`mer.router.remote_dispatcher.RemoteDispatcher` (`--cluster`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zmq.asyncio

from mer.cluster.shard_link import CurveShardLink, ShardLink
from mer.cluster.shard_link_stats import ShardLinkStats
from mer.cluster.shard_map import ShardMap
from mer.cluster.wire_precision import WIRE_DTYPES, WireDtype, from_wire, to_wire
from mer.errors import ConfigError, ProtocolError, RemoteError, ShapeError, ShardUnavailableError
from mer.logging_setup import get_logger
from mer.protocol import ErrorReply, ShardLayerRequest, ShardLayerResult

DEFAULT_SHARD_DEADLINE_S = 10.0
_DOWN = 1 << 62  # the queue length a down shard shows `choose_replica`: it is chosen only if every replica is down


class _NoAnswer(Exception):
    """A shard did not answer one request within the deadline (internal: becomes a failover or an error)."""


class RemoteShards:
    """Runs a layer's experts on remote shard groups (see the module docstring)."""

    def __init__(self, shard_map: ShardMap, links: Sequence[ShardLink], *,
                 deadline_s: float = DEFAULT_SHARD_DEADLINE_S, wire_dtype: WireDtype = "f32", log=None,
                 context: zmq.asyncio.Context | None = None):
        if len(links) != shard_map.num_shards:
            raise ConfigError(f"{len(links)} shard endpoints for a shard map of {shard_map.num_shards} shards")
        if not deadline_s > 0:
            raise ConfigError(f"the shard deadline must be > 0 seconds, got {deadline_s!r}")
        if wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        self.shard_map = shard_map
        self.links = list(links)
        self.deadline_s = deadline_s
        self.wire_dtype = wire_dtype
        self.log = log if log is not None else get_logger()
        self.down: dict[int, str] = {}  # shard -> why it was marked down
        self._context = context
        self._in_flight: list[dict[int, asyncio.Future]] = [{} for _ in self.links]
        self._request_ids = itertools.count()
        self._receivers: list[asyncio.Task] = []
        self.stats = [ShardLinkStats(shard, link.endpoint) for shard, link in enumerate(self.links)]

    @classmethod
    def connect(cls, shard_map: ShardMap, endpoints: Sequence[str], key_dir: str | Path, **options) -> "RemoteShards":
        """CURVE client links to `endpoints[shard]` with the router's keys of `key_dir` (`mer-pipeline keys`)."""
        if len(endpoints) != shard_map.num_shards:
            raise ConfigError(f"{len(endpoints)} shard endpoints for a shard map of {shard_map.num_shards} shards")
        context = zmq.asyncio.Context()
        links: list[ShardLink] = []
        try:
            for endpoint in endpoints:
                links.append(CurveShardLink(context, endpoint, key_dir))
        except BaseException:
            for link in links:
                link.close()
            context.term()
            raise
        return cls(shard_map, links, context=context, **options)

    def queue_lengths(self) -> list[int]:
        """Requests in flight to each shard now."""
        return [len(requests) for requests in self._in_flight]

    async def run_layer(self, layer: int, batches: Mapping[int, np.ndarray], token: int = 0) -> dict[int, np.ndarray]:
        """`{expert: each row's output}` for `{expert: rows}` of MoE layer `layer` (see the module docstring)."""
        self._start_receivers()
        experts = self._check_batches(layer, batches)
        outputs: dict[int, np.ndarray] = {}
        remaining = experts
        while remaining:
            plan = self._plan(layer, remaining)
            requests = {shard: self._request(token, layer, chosen, batches) for shard, chosen in plan.items()}
            answers = await asyncio.gather(*(self._ask(shard, request) for shard, request in requests.items()),
                                           return_exceptions=True)
            remaining, failures, errors = [], [], []
            for (shard, request), answer in zip(requests.items(), answers):
                if isinstance(answer, _NoAnswer):
                    self._mark_down(shard, str(answer))
                    failures.append((shard, request))
                    remaining += request.experts
                elif isinstance(answer, BaseException):
                    errors.append(answer)
                else:
                    outputs.update(self._split(request, answer))
            if errors:  # after marking every silent shard down
                raise errors[0]
            for shard, request in failures:
                self._fail_over(layer, shard, request)
            remaining.sort()
        return {expert: outputs[expert] for expert in experts}

    async def close(self) -> None:
        """Stop receiving, close every link (and the context `connect` made). Requests in flight are cancelled."""
        for task in self._receivers:
            task.cancel()
        for task in self._receivers:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._receivers = []
        for requests in self._in_flight:
            for future in requests.values():
                future.cancel()
            requests.clear()
        for link in self.links:
            link.close()
        if self._context is not None:
            self._context.term()
            self._context = None

    # --- planning -----------------------------------------------------------------------------------

    def _check_batches(self, layer: int, batches: Mapping[int, np.ndarray]) -> list[int]:
        if not 0 <= layer < self.shard_map.layers:
            raise ConfigError(f"MoE layer {layer} is not in the shard map's 0..{self.shard_map.layers - 1}")
        if not batches:
            raise ConfigError(f"run_layer({layer}): no experts to run")
        experts = sorted(batches)
        outside = [e for e in experts if not 0 <= e < self.shard_map.experts_per_layer]
        if outside:
            raise ConfigError(f"layer {layer} experts {outside[:16]} are not in the shard map's "
                              f"0..{self.shard_map.experts_per_layer - 1}")
        widths = {batches[e].shape[1] if batches[e].ndim == 2 else None for e in experts}
        for expert in experts:
            rows = batches[expert]
            if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[0] == 0 or len(widths) != 1:
                raise ShapeError(f"layer {layer} expert {expert}: rows must be float32 [n >= 1, d_model] of one "
                                 f"width for every expert, got {rows.dtype} {list(rows.shape)}")
        return experts

    def _plan(self, layer: int, experts: list[int]) -> dict[int, list[int]]:
        """{shard: its experts}, each expert on its replica with the shortest queue; ShardUnavailableError if
        every replica of an expert is down."""
        queues = [_DOWN if shard in self.down else length for shard, length in enumerate(self.queue_lengths())]
        plan: dict[int, list[int]] = {}
        stranded: list[int] = []
        for expert in experts:
            shard = self.shard_map.choose_replica(self._global(layer, expert), queues)
            if shard in self.down:
                stranded.append(expert)
            else:
                plan.setdefault(shard, []).append(expert)
        if stranded:
            self._raise_unavailable(layer, stranded)
        return dict(sorted(plan.items()))

    def _raise_unavailable(self, layer: int, experts: list[int], failed_shard: int | None = None):
        shards = sorted({shard for e in experts for shard in self.shard_map.shards_of(self._global(layer, e))})
        shard = failed_shard if failed_shard is not None else shards[0]
        names = ", ".join(f"{e} (id {self._global(layer, e)})" for e in experts[:16])
        downs = "; ".join(f"shard {s} ({self.links[s].endpoint}): {self.down[s]}" for s in shards)
        message = (f"shard {shard} ({self.links[shard].endpoint}) is down and layer {layer} experts {names} have no "
                   f"other live replica (replicas on shards {shards}: {downs})")
        self.log.error("shard_unavailable", shard=shard, endpoint=self.links[shard].endpoint, moe_layer=layer,
                       experts=experts, shards=shards, reason=self.down[shard])
        raise ShardUnavailableError(message, shard, tuple(experts))

    def _fail_over(self, layer: int, shard: int, request: ShardLayerRequest) -> None:
        stranded = [e for e in request.experts
                    if all(s in self.down for s in self.shard_map.shards_of(self._global(layer, e)))]
        if stranded:
            self._raise_unavailable(layer, stranded, failed_shard=shard)
        self.log.warning("shard_failed_over", shard=shard, endpoint=self.links[shard].endpoint,
                         request_id=request.request_id, moe_layer=layer, experts=request.experts,
                         reason=self.down[shard])
        self.stats[shard].failovers += 1

    def _mark_down(self, shard: int, reason: str) -> None:
        self.down.setdefault(shard, reason)
        self.stats[shard].down = True

    def _global(self, layer: int, expert: int) -> int:
        return layer * self.shard_map.experts_per_layer + expert

    def _request(self, token: int, layer: int, experts: list[int], batches: Mapping[int, np.ndarray]) -> ShardLayerRequest:
        offsets = [0]
        for expert in experts:
            offsets.append(offsets[-1] + batches[expert].shape[0])
        x = np.concatenate([batches[expert] for expert in experts], axis=0)
        return ShardLayerRequest(next(self._request_ids), token, layer, list(experts), offsets,
                                 to_wire(x, self.wire_dtype))

    # --- talking to the shards ----------------------------------------------------------------------

    async def _ask(self, shard: int, request: ShardLayerRequest) -> ShardLayerResult:
        future = asyncio.get_running_loop().create_future()
        requests = self._in_flight[shard]
        requests[request.request_id] = future
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(self.deadline_s):
                await self.links[shard].send(request)
                answer = await future
        except TimeoutError:
            raise _NoAnswer(f"no answer to request {request.request_id} within {self.deadline_s:g} s") from None
        finally:
            requests.pop(request.request_id, None)
        round_trip_us = (time.perf_counter() - sent) * 1e6
        if isinstance(answer, ErrorReply):
            self.stats[shard].errors += 1
            raise RemoteError(answer.error_type, answer.message, answer.traceback,
                              origin=f"shard {shard} ({self.links[shard].endpoint})")
        answer.check_answers(request)
        self.stats[shard].add_answer(request.x.shape[0], request.x.nbytes, answer.outputs.nbytes, round_trip_us,
                                     answer.compute_us)
        return answer

    def _split(self, request: ShardLayerRequest, result: ShardLayerResult) -> dict[int, np.ndarray]:
        rows = from_wire(result.outputs)
        offsets = request.row_offsets
        return {expert: rows[offsets[i]:offsets[i + 1]] for i, expert in enumerate(request.experts)}

    def _start_receivers(self) -> None:
        if not self._receivers:
            self._receivers = [asyncio.create_task(self._receive(shard)) for shard in range(len(self.links))]

    async def _receive(self, shard: int) -> None:
        """Hand each reply of `shard` to the request waiting for it; drop those nobody waits for any more."""
        link, requests = self.links[shard], self._in_flight[shard]
        while True:
            try:
                answer = await link.recv()
            except ProtocolError as error:
                failure = ProtocolError(f"shard {shard} ({link.endpoint}) sent a malformed reply: {error}")
                self.log.warning("shard_reply_malformed", shard=shard, endpoint=link.endpoint, error=str(error),
                                 requests_failed=sorted(requests))
                for future in requests.values():
                    if not future.done():
                        future.set_exception(failure)
                continue
            future = requests.get(answer.request_id)
            if future is None or future.done():
                self.log.info("shard_late_answer_dropped", shard=shard, endpoint=link.endpoint,
                              request_id=answer.request_id, answer=type(answer).__name__,
                              marked_down=shard in self.down)
                continue
            future.set_result(answer)
