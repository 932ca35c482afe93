"""The remote shard groups' messages (docs/scale-out.md): one request per MoE layer per shard, from the
router over a CURVE-secured tcp socket (`mer.cluster.secure_socket`), and its result.

The hidden states and the outputs travel as raw array frames, float32 by default (the outputs are then
bit-identical to one machine's) or float16 as an option that halves their bytes and rounds each value
as numpy's float16 conversion does (`mer.cluster.wire_precision`). A result has the dtype of its
request. Weights never travel: a shard reads its experts from its own store.
"""

from typing import Annotated

import numpy as np

from mer.errors import ProtocolError
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
