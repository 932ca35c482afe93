"""The shard group's job (docs/scale-out.md): a normal graph (router, its I/O worker and compute workers)
that serves its experts to a remote router over CURVE-secured tcp.

`StartShardGroup` picks it. The job binds a CURVE server ROUTER (`mer.cluster.secure_socket`) that admits
only the router public key of the key directory (`mer.cluster.client_allow_list`; refusals are logged as
`curve_client_refused`, also those ZAP never sees: `mer.cluster.handshake_watch`), logs
`shard_group_listening` with the bound endpoint, and answers each message in turn:

- `ShardLayerRequest`: its experts (ids within `moe_layer`) on their rows, through the graph's one
  `ExpertDispatcher` (leased from the local I/O worker, computed by the local compute workers, each
  expert's d_ff slices summed in slice order), answered with `ShardLayerResult` in the request's dtype:
  f32 outputs are bit-identical to one machine's. A request naming an expert this shard does not serve
  (or a layer or expert its store lacks) is answered with an `ErrorReply` (`ShardExpertsError`) naming
  the shard and the experts, never zeros (`shard_request_refused`); a malformed one, or one whose experts
  fail (a read error, NaN output), with an `ErrorReply` naming why (`shard_request_failed`).
- `StopShardGroup`: answered with itself; the job ends with its `ShardSummary` (`JobDone`), and the
  supervisor brings the graph down.

Requests are served one at a time (a layer's experts already run in parallel on the compute workers), so
the dispatcher's leases always fit. A Shutdown from the supervisor (SIGINT/SIGTERM to `shard-serve`, a
child that died) cancels the job; the socket, the allow list and the context are closed either way.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import numpy as np
import zmq
import zmq.asyncio

from mer.cluster.client_allow_list import ClientAllowList
from mer.cluster.handshake_watch import HandshakeWatch
from mer.cluster.keys import load_key_pair, load_public_key
from mer.cluster.secure_socket import curve_server_socket
from mer.cluster.wire_precision import from_wire, to_wire, wire_dtype_of
from mer.config import PipelineConfig
from mer.errors import ConfigError, ShardExpertsError
from mer.metrics.summary import ShardSummary
from mer.protocol import (UNKNOWN_REQUEST_ID, ShardLayerRequest, ShardLayerResult, StartShardGroup, StopShardGroup,
                          decode, encode, error_reply)
from mer.router.compute_client import ComputeClient
from mer.router.dispatcher import ExpertDispatcher, router_lease_limit
from mer.router.io_client import IoClient
from mer.router.job import Job
from mer.store.manifest import Manifest

def served_experts(start: StartShardGroup, manifest: Manifest, store: str) -> frozenset[int]:
    """The global ids the shard serves: `start.experts`, each checked to be in the store, or every expert the
    store holds (a shard store's own experts)."""
    if start.experts is None:
        return frozenset(entry.id for entry in manifest.experts)
    absent = absent_experts(start.experts, manifest)
    if absent:
        raise ConfigError(f"shard {start.shard}: experts {absent[:16]} are not in the store {store} "
                          f"({store_holding(manifest)})")
    return frozenset(start.experts)


def absent_experts(experts, manifest: Manifest) -> list[int]:
    """The ids of `experts` the store does not hold, ascending."""
    return sorted(expert for expert in experts if not manifest.holds(expert))


def store_holding(manifest: Manifest) -> str:
    """What the store holds, in words: `it holds ids 0..15` or the shard's `it holds only the 8 experts of ...`."""
    if manifest.shard is None:
        return f"it holds ids 0..{len(manifest.experts) - 1}"
    return f"it holds only the {len(manifest.experts)} experts of {manifest.shard.describe()}"


class ShardJob(Job):
    """Serves this shard's experts over CURVE until `StopShardGroup` or Shutdown (see the module docstring)."""

    def __init__(self, start: StartShardGroup, config: PipelineConfig, manifest: Manifest, io: IoClient,
                 compute: ComputeClient, observe, log, send_control: Callable[[object], Awaitable[None]]):
        # the jobs' common arguments: a shard tells its predictor nothing yet (`observe`) and reports to the
        # supervisor only through `JobDone` (`send_control`)
        self.start = start
        self.config = config
        self.manifest = manifest
        self.compute = compute
        self.log = log
        self.served = served_experts(start, manifest, str(config.store))
        self.dispatcher = ExpertDispatcher(manifest, io, compute, max_leases=router_lease_limit(config),
                                            expert_slices=config.expert_slices)
        self.endpoint = ""
        self.requests = self.rows = self.expert_batches = self.errors = 0
        self.hits = self.misses = 0
        self.compute_us = 0.0

    async def run(self) -> ShardSummary:
        server_keys = load_key_pair(self.start.key_dir, "shard")
        allowed = [load_public_key(self.start.key_dir, "router")]
        started = time.monotonic()
        context = zmq.asyncio.Context()
        allow = ClientAllowList(context, allowed)
        allow.start()
        socket = curve_server_socket(context, zmq.ROUTER, server_keys)
        watch = HandshakeWatch(socket)
        try:
            try:
                socket.bind(self.start.bind)
            except zmq.ZMQError as error:
                raise ConfigError(f"shard {self.start.shard}: cannot bind {self.start.bind} ({error})") from None
            watch.start()
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            self.log.info("shard_group_listening", shard=self.start.shard, endpoint=self.endpoint,
                          experts=len(self.served), compute_workers=self.compute.num_workers,
                          router_public=allowed[0].decode())
            await self._serve(socket)
        finally:
            await watch.stop()
            socket.close(linger=0)
            allow.stop()
            context.term()
        summary = ShardSummary(
            shard=self.start.shard, endpoint=self.endpoint, experts_served=len(self.served), requests=self.requests,
            rows=self.rows, expert_batches=self.expert_batches, errors=self.errors, hits=self.hits,
            misses=self.misses, compute_us=round(self.compute_us, 1), seconds=round(time.monotonic() - started, 3),
            compute_workers=self.compute.num_workers)
        self.log.info("shard_group_summary", **summary.to_json_dict())
        return summary

    async def _serve(self, socket: zmq.asyncio.Socket) -> None:
        """Answer each message in turn until `StopShardGroup`."""
        while True:
            identity, *frames = await socket.recv_multipart(copy=False)
            reply = await self._answer(frames)
            await socket.send_multipart([identity, *encode(reply)], copy=False)
            if isinstance(reply, StopShardGroup):
                return

    async def _answer(self, frames) -> ShardLayerResult | StopShardGroup:
        try:
            message = decode(frames, expected_kinds=(ShardLayerRequest, StopShardGroup))
        except Exception as error:  # answered and dropped: the socket keeps serving
            self.errors += 1
            self.log.warning("shard_request_failed", shard=self.start.shard, request_id=UNKNOWN_REQUEST_ID,
                             error=str(error))
            return error_reply(UNKNOWN_REQUEST_ID, error)
        if isinstance(message, StopShardGroup):
            return message
        try:
            message.check()
            batches = self._batches(message)
        except ShardExpertsError as error:
            self.errors += 1
            self.log.warning("shard_request_refused", shard=self.start.shard, request_id=message.request_id,
                             moe_layer=message.moe_layer, experts=message.experts, error=str(error))
            return error_reply(message.request_id, error)
        except Exception as error:
            return self._failed(message, error)
        try:
            return await self._compute(message, batches)
        except Exception as error:
            return self._failed(message, error)

    def _failed(self, request: ShardLayerRequest, error: Exception):
        self.errors += 1
        self.log.warning("shard_request_failed", shard=self.start.shard, request_id=request.request_id,
                         moe_layer=request.moe_layer, experts=request.experts, error=str(error))
        return error_reply(request.request_id, error)

    def _batches(self, request: ShardLayerRequest) -> dict[int, np.ndarray]:
        """`{global id: rows}` of the request, in its experts' order; ShardExpertsError names the experts
        this shard does not serve."""
        geometry = self.manifest.geometry
        if request.moe_layer >= geometry.num_moe_layers:
            raise ShardExpertsError(f"shard {self.start.shard}: MoE layer {request.moe_layer} is not in its store "
                                    f"({geometry.num_moe_layers} MoE layers); experts {request.experts[:16]}")
        outside = [expert for expert in request.experts if expert >= geometry.experts_per_layer]
        missing = [expert for expert in request.experts if expert < geometry.experts_per_layer
                   and self.manifest.expert_id(request.moe_layer, expert) not in self.served]
        if outside or missing:
            names = [f"{expert} (id {self.manifest.expert_id(request.moe_layer, expert)})" for expert in missing]
            names += [f"{expert} (no such expert: {geometry.experts_per_layer} per layer)" for expert in outside]
            raise ShardExpertsError(f"shard {self.start.shard} does not serve layer {request.moe_layer} experts "
                                    f"{', '.join(names[:16])} (it serves {len(self.served)} experts)")
        x = from_wire(request.x)
        offsets = request.row_offsets
        return {self.manifest.expert_id(request.moe_layer, expert): x[offsets[index]:offsets[index + 1]]
                for index, expert in enumerate(request.experts)}

    async def _compute(self, request: ShardLayerRequest, batches: dict[int, np.ndarray]) -> ShardLayerResult:
        outputs, stats = await self.dispatcher.run_experts(request.token, batches)
        rows = np.concatenate([outputs[expert_id] for expert_id in batches], axis=0).astype(np.float32, copy=False)
        result = ShardLayerResult(request.request_id, self.start.shard, to_wire(rows, wire_dtype_of(request.x)),
                                  stats.compute_us)
        self.requests += 1
        self.rows += rows.shape[0]
        self.expert_batches += len(batches)
        self.hits += stats.hits
        self.misses += stats.misses
        self.compute_us += stats.compute_us
        return result
