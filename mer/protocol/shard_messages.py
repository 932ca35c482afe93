"""The remote shard groups' messages (docs/scale-out.md): one request per MoE layer per shard, from the
router over a CURVE-secured tcp socket (`mer.cluster.secure_socket`), and its result.

The hidden states and the outputs travel as raw array frames, float32 by default (the outputs are then
bit-identical to one machine's) or float16 as an option that halves their bytes and rounds each value
as numpy's float16 conversion does (`mer.cluster.wire_precision`). A result has the dtype of its
request. Weights never travel: a shard reads its experts from its own store.
"""

from typing import Annotated, NamedTuple

import numpy as np

from mer.errors import ConfigError, ProtocolError
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import ArraySpec, equal_with_arrays, message

WireRows = Annotated[np.ndarray, ArraySpec("float32", ("rows", "d_model"), other_dtypes=("float16",))]


@message(MessageKind.SHARD_LAYER_REQUEST)
class ShardLayerRequest:
    """Compute `experts` of MoE layer `moe_layer` on a shard: expert `experts[i]` (its id within the layer)
    on the rows `x[row_offsets[i]:row_offsets[i + 1]]` (expert-major, as `ExpertBatchJob`). `experts`
    ascend strictly; `row_offsets` has one entry more, starts at 0, grows strictly and ends at the rows
    of `x`. `token` is the router's step (the shard's I/O worker and predictor see it as the local
    router's)."""

    request_id: int
    token: int
    moe_layer: int
    experts: list[int]
    row_offsets: list[int]
    x: WireRows

    __eq__ = equal_with_arrays

    def check(self) -> None:
        if self.moe_layer < 0:
            raise ProtocolError(f"ShardLayerRequest.moe_layer {self.moe_layer} is negative")
        if not self.experts or self.experts[0] < 0 or any(b <= a for a, b in zip(self.experts, self.experts[1:])):
            raise ProtocolError(f"ShardLayerRequest.experts {self.experts[:8]}... must be non-negative ids in "
                                f"strictly ascending order (at least one)")
        offsets, rows = self.row_offsets, self.x.shape[0]
        if len(offsets) != len(self.experts) + 1 or offsets[0] != 0 or offsets[-1] != rows:
            raise ProtocolError(f"ShardLayerRequest.row_offsets {offsets[:8]}... must have {len(self.experts) + 1} "
                                f"entries from 0 to the {rows} rows of x")
        if any(stop <= start for start, stop in zip(offsets, offsets[1:])):
            raise ProtocolError(f"ShardLayerRequest.row_offsets {offsets[:8]}... must grow strictly (each expert has rows)")


@message(MessageKind.SHARD_LAYER_RESULT)
class ShardLayerResult:
    """The outputs of a `ShardLayerRequest`: row r is the output of the expert that row r of `x` went to
    (each expert's d_ff slices already summed on the shard, not yet gate-weighted), in `x`'s dtype."""

    request_id: int
    shard: int
    outputs: WireRows
    compute_us: float

    __eq__ = equal_with_arrays

    def check_answers(self, request: ShardLayerRequest) -> None:
        """Raise ProtocolError unless this is the result of `request`: its id, shape and dtype."""
        if self.request_id != request.request_id:
            raise ProtocolError(f"ShardLayerResult {self.request_id} from shard {self.shard} does not answer "
                                f"request {request.request_id}")
        if self.outputs.shape != request.x.shape or self.outputs.dtype != request.x.dtype:
            raise ProtocolError(f"ShardLayerResult {self.request_id} from shard {self.shard}: outputs "
                                f"{self.outputs.dtype} {list(self.outputs.shape)}, the request's x is "
                                f"{request.x.dtype} {list(request.x.shape)}")


class RemoteShardsSpec(NamedTuple):
    """The remote shard groups a job's router sends its experts to (`--cluster`, docs/scale-out.md): in the
    start messages of generation, serving and the benchmark (`remote_shards`; None: the local graph).

    `endpoints[shard]` is shard group `shard`'s `tcp://HOST:PORT`; `key_dir` holds the router's key pair and
    the shards' public key (`mer-pipeline keys`); the shard map is `replicas`, `layers`, `experts_per_layer`
    and `placements` (per global expert id, its shards, primary first: `mer.cluster.shard_map`);
    `deadline_s` is the wait for a shard's answer before it fails over; `wire_precision` is `f32`
    (bit-exact) or `f16`."""

    endpoints: list[str]
    key_dir: str
    replicas: int
    layers: int
    experts_per_layer: int
    placements: list[list[int]]
    deadline_s: float
    wire_precision: str

    def check(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if not self.endpoints or any(not e.startswith("tcp://") or ":" not in e.removeprefix("tcp://")
                                     for e in self.endpoints):
            raise ConfigError(f"remote_shards.endpoints {self.endpoints[:8]}: each must be tcp://HOST:PORT")
        if not self.deadline_s > 0:
            raise ConfigError(f"remote_shards.deadline_s must be > 0 seconds, got {self.deadline_s!r}")
        if self.wire_precision not in ("f32", "f16"):
            raise ConfigError(f"remote_shards.wire_precision {self.wire_precision!r} is not f32 or f16")


# --- control.sock: the shard group's job (`mer-pipeline shard-serve`, mer.router.shard_job) --------


@message(MessageKind.START_SHARD_GROUP)
class StartShardGroup:
    """Every child is ready: serve `ShardLayerRequest`s as shard `shard` on a CURVE server ROUTER bound
    to `bind` (`tcp://HOST:PORT`; port 0 picks a free one, logged in `shard_group_listening`), with the
    shard key pair and the admitted router public key from `key_dir` (`mer-pipeline keys`). `experts`
    are the global store ids this shard serves (None: every expert of its store). Checked when built
    (in the CLI, before any process starts) and when decoded: a bad field is a `ConfigError` naming it."""

    bind: str
    key_dir: str
    shard: int = 0
    experts: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.bind.startswith("tcp://") or ":" not in self.bind.removeprefix("tcp://"):
            raise ConfigError(f"StartShardGroup.bind {self.bind!r}: a shard group binds tcp://HOST:PORT")
        if isinstance(self.shard, bool) or not isinstance(self.shard, int) or self.shard < 0:
            raise ConfigError(f"StartShardGroup.shard must be an integer >= 0, got {self.shard!r}")
        if self.experts is not None:
            if not self.experts:
                raise ConfigError("StartShardGroup.experts is empty: a shard group serves at least one expert")
            bad = [e for e in self.experts if isinstance(e, bool) or not isinstance(e, int) or e < 0]
            if bad:
                raise ConfigError(f"StartShardGroup.experts must be expert ids (integers >= 0), got {bad[:8]}")
            if len(set(self.experts)) != len(self.experts):
                raise ConfigError(f"StartShardGroup.experts lists an expert twice: {sorted(self.experts)[:16]}")


@message(MessageKind.STOP_SHARD_GROUP)
class StopShardGroup:
    """From an admitted client on the shard's tcp socket: stop serving (the shard group's job ends and its
    graph shuts down). Answered with the same message once the job takes no more requests."""
