"""The q4_0 / q8_0 dot products for AVX2 + FMA + F16C CPUs: one numba intrinsic of 256-bit IR.

`avx2_dot(weights, position, activation_quants, activation_scales, token_start, dtype, planar,
num_rows, num_tokens)` has the inputs and result of `mer.quant.kernels_vnni.vnni_dot` (see
there: `position`, the row-major `num_rows * num_tokens` float32 tuple, the literals) and gives
the same integer dot per block; only the float32 summation order differs.

A row is read a GROUP at a time, 64 weight bytes (4 q4_0 or 2 q8_0 blocks, the group of the
activation layout `mer.quant.activation`), in two 32-byte HALVES; a group's exact integer dot
with a token ends up in 8 int32 lanes, two or four per block (`GroupFormat.lane_blocks`):

- q4_0: the nibbles become signed weights `w = n - 8` in [-8, 7] (low nibbles pair with the
  activation's first 64 bytes, high nibbles with the next 64), the activation bytes stay
  unsigned `u = q + 128`; `vpmaddubsw(u, w)` sums two products per int16 lane, at most
  2 * 255 * 8 = 4080 in size, so it never saturates. Per half the low and high results are
  added, `vphaddw` sums lane pairs of both halves into one vector (4 blocks, 8 products per
  lane), and `128 * (sum of the lane's w)` (prepared the same way from 128s once per row and
  group, shared by every token) is subtracted. The exact result, 8 products of |q| <= 128 and
  |w| <= 8, fits int16, so the wrapping int16 arithmetic is exact; `vpmaddwd` with ones then
  sums lane pairs into int32.
- mxfp4: as q4_0, the nibbles looked up (`vpshufb`) in the table of doubled E2M1 values,
  w in [-12, 12]: pair sums at most 2 * 255 * 12 = 6120, the exact result 8 * 128 * 12 = 12288
  fits int16; the weight scale is half the block's E8M0 scale (native blocks only).
- q8_0: weights span [-128, 127], where `u * w` pairs would saturate, so the signs move to the
  activation (as ggml does): `vpmaddubsw(|w|, sign(q, w))` with `q = u - 128` in [-127, 127]
  (what `quantize_activation` makes; -128 would not survive the sign flip): each pair sum is at
  most 2 * 128 * 127 = 32512 in size. `|w|` is computed once per row and group. `vpmaddwd`
  with ones gives int32 per half, `vphaddd` joins the halves.

The int32 lanes go to float32, times the weight blocks' scales (f16 -> f32 by F16C, spread over
their lanes once per row and group), fused-multiplied by the token's activation scales (spread
once per token) into one 8-lane float accumulator per (row, token), summed at the end. Rows
come `num_rows` at a time so a group's weights, unpacked once, serve every token of the call;
a last partial group reads its weights with masked loads (`vpmaskmovd`), touching nothing past
the row's slice. Planar weights are one 64-byte quants load and one 8- or 4-byte scales load
per group; native ones are gathered block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mer.quant import vector_ir as vir

GROUP_BYTES = 64
HALF_BYTES = 32
HALVES = 2
LANES = 8
ACTIVATION_OFFSET = 128
# How far ahead of a row's current group its quants are prefetched (as in kernels_vnni).
PREFETCH_BYTES = 4096


@dataclass(frozen=True)
class GroupFormat:
    """How one weight dtype fills a 64-byte group and its two 32-byte halves."""

    blocks_per_group: int
    quant_bytes_per_block: int
    native_block_bytes: int

    @property
    def activation_bytes_per_group(self) -> int:
        return 32 * self.blocks_per_group

    @property
    def lane_blocks(self) -> list[int]:
        """The group's block index of each int32 lane of a group dot: `vphadd` of the two
        halves takes each 128-bit half from the first half-vector, then from the second."""
        if self.blocks_per_group == 4:
            return [0, 0, 2, 2, 1, 1, 3, 3]
        return [0, 0, 1, 1, 0, 0, 1, 1]


GROUP_FORMATS = {
    "q4_0": GroupFormat(blocks_per_group=4, quant_bytes_per_block=16, native_block_bytes=18),
    "q8_0": GroupFormat(blocks_per_group=2, quant_bytes_per_block=32, native_block_bytes=34),
    "mxfp4": GroupFormat(blocks_per_group=4, quant_bytes_per_block=16, native_block_bytes=17),
}
MXFP4_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 codes' values doubled


def _byte_constant(value: int) -> ir.Constant:
    return ir.Constant(vir.vector(vir.INT8, HALF_BYTES), [value] * HALF_BYTES)


def _spread(builder: ir.IRBuilder, block_values: ir.Value, fmt: GroupFormat) -> ir.Value:
    """8 float lanes, each holding its block's value from `block_values` (one lane per block
    of the group), in the lane order of a group dot."""
    indices = ir.Constant(vir.vector(vir.INT32, LANES), fmt.lane_blocks)
    return builder.shuffle_vector(block_values, block_values, indices)


class _WeightRow:
    """Loads one weight row's groups: quants as two 32-byte halves, scales as floats."""

    def __init__(self, emitter: "_DotEmitter", quants_offset: ir.Value, scales_offset: ir.Value):
        self.emitter = emitter
        self.quants_offset = quants_offset
        self.scales_offset = scales_offset

    def _block_offset(self, offset: ir.Value, group: ir.Value, block: int, stride: int) -> ir.Value:
        builder, fmt = self.emitter.builder, self.emitter.format
        index = builder.add(builder.mul(group, vir.INT64(fmt.blocks_per_group)), vir.INT64(block))
        return builder.add(offset, builder.mul(index, vir.INT64(stride)))

    def _load_words(self, offset: ir.Value, count: int, valid_words: ir.Value | None) -> ir.Value:
        """`count` i32 words at `offset` of the weights (those at or past `valid_words` zero)."""
        builder = self.emitter.builder
        pointer = builder.gep(self.emitter.weights, [offset])
        words_type = vir.vector(vir.INT32, count)
        if valid_words is None:
            return vir.load_vector(builder, pointer, words_type)
        mask = vir.lanes_below(builder, count, valid_words)
        return vir.masked_load_vector(builder, pointer, words_type, mask)

    def load_quants(self, group: ir.Value, valid_blocks: ir.Value | None) -> list[ir.Value]:
        """The group's two 32-byte quant halves (zero bytes for blocks at or past `valid_blocks`)."""
        emitter = self.emitter
        builder, fmt = emitter.builder, emitter.format
        words_per_block = fmt.quant_bytes_per_block // 4
        if emitter.planar:
            offset = builder.add(self.quants_offset, builder.mul(group, vir.INT64(GROUP_BYTES)))
            if valid_blocks is None:
                vir.prefetch(builder, builder.gep(emitter.weights, [builder.add(offset, vir.INT64(PREFETCH_BYTES))]))
                valid_words = None
            else:
                valid_words = builder.mul(valid_blocks, vir.INT64(words_per_block))
            words = self._load_words(offset, GROUP_BYTES // 4, valid_words)
        else:
            pieces = []
            for block in range(fmt.blocks_per_group):
                offset = self._block_offset(self.quants_offset, group, block, fmt.native_block_bytes)
                if block == 0 and valid_blocks is None:
                    ahead = builder.add(offset, vir.INT64(PREFETCH_BYTES))
                    vir.prefetch(builder, builder.gep(emitter.weights, [ahead]))
                valid_words = None
                if valid_blocks is not None:
                    is_valid = builder.icmp_unsigned(">", valid_blocks, vir.INT64(block))
                    valid_words = builder.select(is_valid, vir.INT64(words_per_block), vir.INT64(0))
                pieces.append(self._load_words(offset, words_per_block, valid_words))
            words = vir.concatenate(builder, pieces)
        group_bytes = builder.bitcast(words, vir.vector(vir.INT8, GROUP_BYTES))
        return [vir.lanes(builder, group_bytes, half * HALF_BYTES, HALF_BYTES) for half in range(HALVES)]

    def load_scales(self, group: ir.Value, valid_blocks: ir.Value | None) -> ir.Value:
        """The group's weight scales as float32, one lane per block (0 for missing blocks)."""
        emitter = self.emitter
        builder, fmt = emitter.builder, emitter.format
        if emitter.dtype == "mxfp4":
            return self._mxfp4_half_scales(group, valid_blocks)
        halves_type = vir.vector(vir.INT16, fmt.blocks_per_group)
        if emitter.planar:
            offset = builder.add(self.scales_offset, builder.mul(group, vir.INT64(2 * fmt.blocks_per_group)))
            pointer = builder.gep(emitter.weights, [offset])
            if valid_blocks is None:
                halves = vir.load_vector(builder, pointer, halves_type)
            else:
                mask = vir.lanes_below(builder, fmt.blocks_per_group, valid_blocks)
                halves = vir.masked_load_vector(builder, pointer, halves_type, mask)
        else:
            halves = ir.Constant(halves_type, None)
            for block in range(fmt.blocks_per_group):
                offset = self._block_offset(self.scales_offset, group, block, fmt.native_block_bytes)
                pointer = builder.bitcast(builder.gep(emitter.weights, [offset]), vir.INT16.as_pointer())
                if valid_blocks is None:
                    value = builder.load(pointer, align=1)
                else:
                    one = vir.vector(vir.INT16, 1)
                    is_valid = builder.icmp_unsigned(">", valid_blocks, vir.INT64(block))
                    piece = vir.masked_load_vector(
                        builder, builder.bitcast(pointer, vir.INT8.as_pointer()), one, vir.splat(builder, is_valid, 1)
                    )
                    value = builder.extract_element(piece, vir.INT32(0))
                halves = builder.insert_element(halves, value, vir.INT32(block))
        return vir.float32_from_float16_bits(builder, halves)


    def _mxfp4_half_scales(self, group: ir.Value, valid_blocks: ir.Value | None) -> ir.Value:
        """The group's E8M0 scale bytes (native blocks) as float32 half-scales, one lane per block."""
        builder, fmt = self.emitter.builder, self.emitter.format
        exponents = ir.Constant(vir.vector(vir.INT8, fmt.blocks_per_group), None)
        for block in range(fmt.blocks_per_group):
            pointer = builder.gep(self.emitter.weights, [self._block_offset(self.scales_offset, group, block,
                                                                            fmt.native_block_bytes)])
            if valid_blocks is None:
                value = builder.load(pointer)
            else:
                is_valid = builder.icmp_unsigned(">", valid_blocks, vir.INT64(block))
                piece = vir.masked_load_vector(builder, pointer, vir.vector(vir.INT8, 1), vir.splat(builder, is_valid, 1))
                value = builder.extract_element(piece, vir.INT32(0))
            exponents = builder.insert_element(exponents, value, vir.INT32(block))
        return vir.float32_from_e8m0_half(builder, exponents)


@dataclass
class _RowGroup:
    """One row's group, prepared once for every token: per half the byte vectors that meet the
    activation, (q4_0) the int16 correction of the activation's +128, the spread scales."""

    parts: list[list[ir.Value]]
    correction: ir.Value | None
    scales: ir.Value


class _DotEmitter:
    """Emits the IR of one `avx2_dot` call."""

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

    def _prepare_row(self, row: _WeightRow, group: ir.Value, valid_blocks: ir.Value | None) -> _RowGroup:
        builder = self.builder
        halves = row.load_quants(group, valid_blocks)
        scales = _spread(builder, row.load_scales(group, valid_blocks), self.format)
        if self.dtype == "q8_0":
            return _RowGroup([[vir.absolute_bytes(builder, half), half] for half in halves], None, scales)
        parts, corrections = [], []
        table = ir.Constant(vir.vector(vir.INT8, HALF_BYTES), list(MXFP4_DOUBLED) * (HALF_BYTES // 16))
        for raw in halves:
            if self.dtype == "mxfp4":  # each nibble looks up its doubled E2M1 value (-12..12)
                low = vir.shuffle_bytes(builder, table, builder.and_(raw, _byte_constant(0x0F)))
                high = vir.shuffle_bytes(builder, table, builder.lshr(raw, _byte_constant(4)))
            else:
                low = builder.sub(builder.and_(raw, _byte_constant(0x0F)), _byte_constant(8))
                high = builder.sub(builder.lshr(raw, _byte_constant(4)), _byte_constant(8))
            both = builder.add(low, high)
            corrections.append(vir.multiply_add_unsigned_signed_bytes(builder, _byte_constant(ACTIVATION_OFFSET), both))
            parts.append([low, high])
        return _RowGroup(parts, vir.add_adjacent_pairs(builder, *corrections), scales)

    def _token_index(self, group: ir.Value, token: int) -> ir.Value:
        """Index of (group, token_start + token) in the activation's [group, token] order."""
        builder = self.builder
        return builder.add(builder.add(builder.mul(group, self.batch), self.token_start), vir.INT64(token))

    def _token_bytes(self, index: ir.Value, start: int) -> ir.Value:
        builder = self.builder
        group_bytes = vir.INT64(self.format.activation_bytes_per_group)
        offset = builder.add(builder.mul(index, group_bytes), vir.INT64(start))
        pointer = builder.gep(self.activation_quants, [offset])
        return vir.load_vector(builder, pointer, vir.vector(vir.INT8, HALF_BYTES))

    def _token_scales(self, index: ir.Value) -> ir.Value:
        builder, fmt = self.builder, self.format
        pointer = builder.gep(self.activation_scales, [builder.mul(index, vir.INT64(fmt.blocks_per_group))])
        return vir.load_vector(builder, pointer, vir.vector(vir.FLOAT, fmt.blocks_per_group))

    def _group_dot(self, prepared: _RowGroup, activation: list[list[ir.Value]]) -> ir.Value:
        """The 8 int32 lanes of the group's exact integer dot with one token."""
        builder = self.builder
        if self.dtype == "q8_0":
            sums = []
            for (magnitudes, signs), (values,) in zip(prepared.parts, activation):
                signed = vir.copy_sign_bytes(builder, values, signs)
                sums.append(vir.sum_word_pairs(builder, vir.multiply_add_unsigned_signed_bytes(builder, magnitudes, signed)))
            return vir.add_adjacent_pairs(builder, *sums)
        words = [
            builder.add(
                vir.multiply_add_unsigned_signed_bytes(builder, low_activation, low),
                vir.multiply_add_unsigned_signed_bytes(builder, high_activation, high),
            )
            for (low, high), (low_activation, high_activation) in zip(prepared.parts, activation)
        ]
        joined = vir.add_adjacent_pairs(builder, *words)
        return vir.sum_word_pairs(builder, builder.sub(joined, prepared.correction))

    def _token_halves(self, index: ir.Value) -> list[list[ir.Value]]:
        """Per half, the activation byte vectors it meets: q4_0 (low, high) as stored, q8_0 the
        signed q (stored byte xor 0x80)."""
        builder = self.builder
        if self.dtype == "q8_0":
            return [
                [builder.xor(self._token_bytes(index, half * HALF_BYTES), _byte_constant(ACTIVATION_OFFSET))]
                for half in range(HALVES)
            ]
        return [
            [self._token_bytes(index, half * HALF_BYTES), self._token_bytes(index, GROUP_BYTES + half * HALF_BYTES)]
            for half in range(HALVES)
        ]

    def emit_group(self, group: ir.Value, accumulators: list[list[ir.Value]], valid_blocks: ir.Value | None) -> None:
        """Add one group's contribution to every (row, token) float accumulator (allocas)."""
        builder, fmt = self.builder, self.format
        lanes_float = vir.vector(vir.FLOAT, LANES)
        prepared = [self._prepare_row(row, group, valid_blocks) for row in self.rows]
        for token in range(self.num_tokens):
            index = self._token_index(group, token)
            activation = self._token_halves(index)
            token_scales = _spread(builder, self._token_scales(index), fmt)
            for row_index, row in enumerate(prepared):
                dot = builder.sitofp(self._group_dot(row, activation), lanes_float)
                accumulator = accumulators[row_index][token]
                total = vir.multiply_add(builder, builder.fmul(dot, row.scales), token_scales, builder.load(accumulator))
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
def avx2_dot(  # type: ignore[no-untyped-def]
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
        emitter = _DotEmitter(context, builder, signature, args, dtype_name, is_planar, row_count, token_count)
        return emitter.emit(context, signature.return_type)

    return signature, codegen
