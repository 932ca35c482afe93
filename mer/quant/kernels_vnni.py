"""The fast q4_0 / q8_0 dot products: one numba intrinsic emitting AVX-512 VNNI vector IR.

`vnni_dot(weights, position, activation_quants, activation_scales, token_start, dtype, planar,
num_rows, num_tokens)` returns, as a tuple of `num_rows * num_tokens` float32 (row-major: row
0's tokens first), the dot products of `num_rows` consecutive weight rows with the q8_0
activations of tokens `token_start ...` (layout: `mer.quant.activation`; C-contiguous arrays).
`position` = (quants_offset, scales_offset, row_quant_stride, row_scale_stride, num_blocks):
each row is a run of `num_blocks` consecutive blocks whose quants and scales start at those
byte offsets of `weights`, row i `i * row_quant_stride` / `i * row_scale_stride` bytes later.
`dtype` ("q4_0", "q8_0" or "mxfp4", native only), `planar`, `num_rows` and `num_tokens` must be compile-time constants.

Each row is processed a GROUP at a time: 64 weight bytes, i.e. 4 q4_0 blocks or 2 q8_0 blocks,
in 16 int32 lanes of which each holds a part of one block's integer dot product (lane l is in
block l // 4 for q4_0, l // 8 for q8_0):

- the weights become signed bytes: q4_0 nibbles minus 8 (low nibbles = elements 0-15 of each
  block, high nibbles = elements 16-31), q8_0 bytes as they are, MXFP4 nibbles looked up in the
  table of doubled E2M1 values (`vpshufb`; the block's weight scale is then half its E8M0 scale);
- the activation bytes are stored unsigned, `q + 128`, so `vpdpbusd` (unsigned x signed bytes,
  four adjacent products summed per int32 lane) can multiply them; the `+ 128` is removed by
  starting each lane at `-128 * (sum of its weight bytes)`, computed once per row and group with
  `vpdpbusd` on a vector of 128s and shared by all tokens.

Each lane's exact integer sum is converted to float32, multiplied by its block's weight scale
(f16 -> f32) and by the token's activation scale of that block, and accumulated in 16 float
lanes per (row, token); these are summed once at the end. Processing two rows at a time halves
the activation bytes read per row, which matters when a batch of tokens does not fit in L1.
A last partial group (a row slice whose block count is not a multiple of the group) reads the
weights with masked loads, so nothing past the slice is touched.

Layouts: "planar" reads a group's quants with one 64-byte load and its f16 scales with one small
load (`mer.quant.planar`); "native" gathers them from the 18- or 34-byte GGUF blocks
(`quants_offset` then points at the first block's quants, 2 bytes into it).
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mer.quant import vector_ir as vir

GROUP_BYTES = 64
LANES = 16
ACTIVATION_OFFSET = 128
# How far ahead of a row's current group its quants are prefetched: measured on the Mixtral
# gate matrix, batch 1, one thread: 4.3 ms without, 1.7-2.0 ms with 2048 or 4096 bytes.
PREFETCH_BYTES = 4096


@dataclass(frozen=True)
class GroupFormat:
    """How one weight dtype fills a 64-byte group."""

    blocks_per_group: int
    quant_bytes_per_block: int
    native_block_bytes: int

    @property
    def lanes_per_block(self) -> int:
        return LANES // self.blocks_per_group

    @property
    def activation_bytes_per_group(self) -> int:
        return 32 * self.blocks_per_group


GROUP_FORMATS = {
    "q4_0": GroupFormat(blocks_per_group=4, quant_bytes_per_block=16, native_block_bytes=18),
    "q8_0": GroupFormat(blocks_per_group=2, quant_bytes_per_block=32, native_block_bytes=34),
    "mxfp4": GroupFormat(blocks_per_group=4, quant_bytes_per_block=16, native_block_bytes=17),
}
MXFP4_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 codes' values doubled


def _byte_constant(value: int) -> ir.Constant:
    return ir.Constant(vir.vector(vir.INT8, GROUP_BYTES), [value] * GROUP_BYTES)


class _WeightRow:
    """Loads one weight row's groups (quants as signed byte vectors, scales as float lanes)."""

    def __init__(self, emitter: "_DotEmitter", quants_offset: ir.Value, scales_offset: ir.Value):
        self.emitter = emitter
        self.quants_offset = quants_offset
        self.scales_offset = scales_offset

    def _block_offset(self, offset: ir.Value, group: ir.Value, block: int, stride: int) -> ir.Value:
        builder, fmt = self.emitter.builder, self.emitter.format
        index = builder.add(builder.mul(group, vir.INT64(fmt.blocks_per_group)), vir.INT64(block))
        return builder.add(offset, builder.mul(index, vir.INT64(stride)))

    def _load_native(
        self, offsets: list[ir.Value], piece_type: ir.VectorType, valid_blocks: ir.Value | None
    ) -> list[ir.Value]:
        builder = self.emitter.builder
        pieces = []
        for block, offset in enumerate(offsets):
            pointer = builder.gep(self.emitter.weights, [offset])
            if valid_blocks is None:
                pieces.append(vir.load_vector(builder, pointer, piece_type))
            else:
                is_valid = builder.icmp_unsigned(">", valid_blocks, vir.INT64(block))
                mask = vir.splat(builder, is_valid, piece_type.count)
                pieces.append(vir.masked_load_vector(builder, pointer, piece_type, mask))
        return pieces

    def load_quants(self, group: ir.Value, valid_blocks: ir.Value | None) -> ir.Value:
        """The group's 64 quant bytes (zero for blocks at or past `valid_blocks`)."""
        emitter = self.emitter
        builder, fmt = emitter.builder, emitter.format
        group_vector = vir.vector(vir.INT8, GROUP_BYTES)
        if emitter.planar:
            offset = builder.add(self.quants_offset, builder.mul(group, vir.INT64(GROUP_BYTES)))
            pointer = builder.gep(emitter.weights, [offset])
            if valid_blocks is None:
                vir.prefetch(builder, builder.gep(pointer, [vir.INT64(PREFETCH_BYTES)]))
                return vir.load_vector(builder, pointer, group_vector)
            valid_bytes = builder.mul(valid_blocks, vir.INT64(fmt.quant_bytes_per_block))
            return vir.masked_load_vector(
                builder, pointer, group_vector, vir.lanes_below(builder, GROUP_BYTES, valid_bytes)
            )
        offsets = [
            self._block_offset(self.quants_offset, group, block, fmt.native_block_bytes)
            for block in range(fmt.blocks_per_group)
        ]
        if valid_blocks is None:
            ahead = builder.add(offsets[0], vir.INT64(PREFETCH_BYTES))
            vir.prefetch(builder, builder.gep(emitter.weights, [ahead]))
        piece_type = vir.vector(vir.INT8, fmt.quant_bytes_per_block)
        return vir.concatenate(builder, self._load_native(offsets, piece_type, valid_blocks))

    def load_scales(self, group: ir.Value, valid_blocks: ir.Value | None) -> ir.Value:
        """The group's weight scales as 16 float lanes (each block's scale over its lanes)."""
        emitter = self.emitter
        builder, fmt = emitter.builder, emitter.format
        if emitter.dtype == "mxfp4":
            return vir.repeat_lanes(builder, self._mxfp4_half_scales(group, valid_blocks), fmt.lanes_per_block)
        halves_type = vir.vector(vir.INT16, fmt.blocks_per_group)
        if emitter.planar:
            step = vir.INT64(2 * fmt.blocks_per_group)
            offset = builder.add(self.scales_offset, builder.mul(group, step))
            pointer = builder.gep(emitter.weights, [offset])
            if valid_blocks is None:
                halves = vir.load_vector(builder, pointer, halves_type)
            else:
                mask = vir.lanes_below(builder, fmt.blocks_per_group, valid_blocks)
                halves = vir.masked_load_vector(builder, pointer, halves_type, mask)
        else:
            offsets = [
                self._block_offset(self.scales_offset, group, block, fmt.native_block_bytes)
                for block in range(fmt.blocks_per_group)
            ]
            pieces = self._load_native(offsets, vir.vector(vir.INT16, 1), valid_blocks)
            halves = vir.concatenate(builder, pieces)
        scales = vir.float32_from_float16_bits(builder, halves)
        return vir.repeat_lanes(builder, scales, fmt.lanes_per_block)


    def _mxfp4_half_scales(self, group: ir.Value, valid_blocks: ir.Value | None) -> ir.Value:
        """The group's E8M0 scale bytes as float32 half-scales (`vector_ir.float32_from_e8m0_half`)."""
        builder, fmt = self.emitter.builder, self.emitter.format
        offsets = [self._block_offset(self.scales_offset, group, block, fmt.native_block_bytes)
                   for block in range(fmt.blocks_per_group)]
        pieces = self._load_native(offsets, vir.vector(vir.INT8, 1), valid_blocks)
        return vir.float32_from_e8m0_half(builder, vir.concatenate(builder, pieces))


class _DotEmitter:
    """Emits the IR of one `vnni_dot` call."""

    def __init__(  # type: ignore[no-untyped-def]
        self, context, builder, signature, args, dtype: str, planar: bool, num_rows: int, num_tokens: int
    ):
        self.builder = builder
        self.dtype = dtype
        self.format = GROUP_FORMATS[dtype]
        self.planar = planar
        self.num_tokens = num_tokens
        weights, position, activation_quants, activation_scales, token_start = args[:5]
        quants_offset, scales_offset, row_quant_stride, row_scale_stride, num_blocks = cgutils.unpack_tuple(
            builder, position
        )
        weights_array = context.make_array(signature.args[0])(context, builder, weights)
        self.weights = builder.bitcast(weights_array.data, vir.INT8.as_pointer())
        self.num_blocks = num_blocks
        self.rows = [
            _WeightRow(
                self,
                builder.add(quants_offset, builder.mul(row_quant_stride, vir.INT64(row))),
                builder.add(scales_offset, builder.mul(row_scale_stride, vir.INT64(row))),
            )
            for row in range(num_rows)
        ]
        self.token_start = token_start
        quants_array = context.make_array(signature.args[2])(context, builder, activation_quants)
        scales_array = context.make_array(signature.args[3])(context, builder, activation_scales)
        self.batch = cgutils.unpack_tuple(builder, quants_array.shape)[1]
        self.activation_quants = builder.bitcast(quants_array.data, vir.INT8.as_pointer())
        self.activation_scales = builder.bitcast(scales_array.data, vir.FLOAT.as_pointer())

    def _first_token_index(self, group: ir.Value) -> ir.Value:
        """Index of (group, token_start) in the activation's [group, token] order."""
        builder = self.builder
        return builder.add(builder.mul(group, self.batch), self.token_start)

    def _signed_parts(self, raw: ir.Value) -> list[ir.Value]:
        """The signed weight byte vectors that pair with the activation halves of a group."""
        builder = self.builder
        if self.dtype == "q8_0":
            return [raw]
        if self.dtype == "mxfp4":  # each nibble looks up its doubled E2M1 value (vpshufb per 16 bytes)
            table = ir.Constant(vir.vector(vir.INT8, GROUP_BYTES), list(MXFP4_DOUBLED) * (GROUP_BYTES // 16))
            nibbles = [builder.and_(raw, _byte_constant(0x0F)), builder.lshr(raw, _byte_constant(4))]
            return [vir.shuffle_bytes(builder, table, nibble) for nibble in nibbles]
        low = builder.sub(builder.and_(raw, _byte_constant(0x0F)), _byte_constant(8))
        high = builder.sub(builder.lshr(raw, _byte_constant(4)), _byte_constant(8))
        return [low, high]

    def _lane_offsets(self, parts: list[ir.Value]) -> ir.Value:
        """Per lane `-128 * (sum of its weight bytes)`, the start value of every token's lanes."""
        builder = self.builder
        lanes = vir.vector(vir.INT32, LANES)
        total = ir.Constant(lanes, None)
        for part in parts:
            total = vir.dot_unsigned_signed_bytes(builder, total, _byte_constant(ACTIVATION_OFFSET), part)
        return builder.sub(ir.Constant(lanes, None), total)

    def _token_scales(self, first_token: ir.Value, token: int) -> ir.Value:
        """The token's activation scales of the group's blocks, over their lanes."""
        builder, fmt = self.builder, self.format
        index = builder.mul(builder.add(first_token, vir.INT64(token)), vir.INT64(fmt.blocks_per_group))
        pointer = builder.gep(self.activation_scales, [index])
        scales = vir.load_vector(builder, pointer, vir.vector(vir.FLOAT, fmt.blocks_per_group))
        return vir.repeat_lanes(builder, scales, fmt.lanes_per_block)

    def _token_quants(self, first_token: ir.Value, token: int, part: int) -> ir.Value:
        builder = self.builder
        group_bytes = vir.INT64(self.format.activation_bytes_per_group)
        token_offset = builder.mul(builder.add(first_token, vir.INT64(token)), group_bytes)
        offset = builder.add(token_offset, vir.INT64(GROUP_BYTES * part))
        pointer = builder.gep(self.activation_quants, [offset])
        return vir.load_vector(builder, pointer, vir.vector(vir.INT8, GROUP_BYTES))

    def emit_group(
        self, group: ir.Value, accumulators: list[list[ir.Value]], valid_blocks: ir.Value | None
    ) -> None:
        """Add one group's contribution to every (row, token) float accumulator (allocas)."""
        builder = self.builder
        lanes_float = vir.vector(vir.FLOAT, LANES)
        row_parts, row_offsets, row_scales = [], [], []
        for row in self.rows:
            parts = self._signed_parts(row.load_quants(group, valid_blocks))
            row_parts.append(parts)
            row_offsets.append(self._lane_offsets(parts))
            row_scales.append(row.load_scales(group, valid_blocks))
        first_token = self._first_token_index(group)
        for token in range(self.num_tokens):
            token_scales = self._token_scales(first_token, token)
            quants = [self._token_quants(first_token, token, part) for part in range(len(row_parts[0]))]
            for row_index in range(len(self.rows)):
                dot = row_offsets[row_index]
                for part, activation in zip(row_parts[row_index], quants):
                    dot = vir.dot_unsigned_signed_bytes(builder, dot, activation, part)
                scaled = builder.fmul(builder.sitofp(dot, lanes_float), row_scales[row_index])
                accumulator = accumulators[row_index][token]
                total = vir.multiply_add(builder, scaled, token_scales, builder.load(accumulator))
                builder.store(total, accumulator)

    def emit(self, context, return_type) -> ir.Value:  # type: ignore[no-untyped-def]
        builder, fmt = self.builder, self.format
        lanes_float = vir.vector(vir.FLOAT, LANES)
        accumulators = []
        for _ in self.rows:
            row_accumulators = []
            for _ in range(self.num_tokens):
                accumulator = cgutils.alloca_once(builder, lanes_float)
                builder.store(ir.Constant(lanes_float, None), accumulator)
                row_accumulators.append(accumulator)
            accumulators.append(row_accumulators)
        blocks_per_group = vir.INT64(fmt.blocks_per_group)
        full_groups = builder.udiv(self.num_blocks, blocks_per_group)
        remainder = builder.urem(self.num_blocks, blocks_per_group)
        with cgutils.for_range(builder, full_groups) as loop:
            self.emit_group(loop.index, accumulators, None)
        with builder.if_then(builder.icmp_unsigned(">", remainder, vir.INT64(0))):
            self.emit_group(full_groups, accumulators, remainder)
        sums = [
            vir.horizontal_sum(builder, builder.load(accumulator))
            for row_accumulators in accumulators
            for accumulator in row_accumulators
        ]
        return context.make_tuple(builder, return_type, sums)


@intrinsic(prefer_literal=True)
def vnni_dot(  # type: ignore[no-untyped-def]
    typingctx,
    weights,
    position,
    activation_quants,
    activation_scales,
    token_start,
    dtype,
    planar,
    num_rows,
    num_tokens,
):
    """See the module docstring; dtype, planar, num_rows and num_tokens must be literals."""
    literals = (
        (dtype, types.StringLiteral),
        (planar, types.BooleanLiteral),
        (num_rows, types.IntegerLiteral),
        (num_tokens, types.IntegerLiteral),
    )
    if not all(isinstance(value, kind) for value, kind in literals):
        return None
    dtype_name, is_planar = dtype.literal_value, planar.literal_value
    row_count, token_count = num_rows.literal_value, num_tokens.literal_value
    if dtype_name not in GROUP_FORMATS or row_count < 1 or token_count < 1:
        return None
    arrays = (weights, activation_quants, activation_scales)
    if any(not isinstance(array, types.Array) or array.layout != "C" for array in arrays):
        return None  # the IR addresses the arrays' bytes directly
    if weights.ndim != 1 or activation_quants.ndim != 3 or activation_scales.ndim != 3:
        return None
    signature = types.UniTuple(types.float32, row_count * token_count)(
        weights, types.UniTuple(types.int64, 5), activation_quants, activation_scales, types.int64,
        dtype, planar, num_rows, num_tokens,
    )

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        emitter = _DotEmitter(
            context, builder, signature, args, dtype_name, is_planar, row_count, token_count
        )
        return emitter.emit(context, signature.return_type)

    return signature, codegen
