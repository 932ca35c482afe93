"""The fast q4_K / q5_K / q6_K dot products: one numba intrinsic emitting AVX-512 or AVX2 IR.

`kquant_dot(weights, position, quants, sums, scales, token_start, dtype, width, num_rows,
num_tokens)` returns, as a tuple of `num_rows * num_tokens` float32 (row-major), the dot
products of `num_rows` weight rows with the Q8_K activations of tokens `token_start ...`
(`quants`, `sums`, `scales` of a `mer.quant.activation_k.SuperBlockActivation`; C-contiguous).
`position` = (offset, row_stride, num_blocks): row i is `num_blocks` consecutive super-blocks
starting at byte `offset + i * row_stride` of `weights`. `width` is the vector width in bytes:
64 (AVX-512 BW + VNNI) or 32 (AVX2); `dtype`, `width`, `num_rows` and `num_tokens` are
compile-time constants.

A super-block is read as four PIECES of 64 quant bytes, each one vector (width 64) or two
(width 32), the quants made unsigned (q4_K nibbles 0..15, q5_K 0..31 with the fifth bit from
`qh`, q6_K 0..63 with the top two bits from `qh`, its `- 32` left for later). q6_K: the
activation stores the 64 elements of piece p at bytes 64p ... 64p + 63 of its super-block; per
token and piece, `vpmaddubsw` (unsigned weight x signed activation bytes, adjacent pairs summed
to int16: at most 2 * 63 * 127, never saturating) and then `vpmaddwd` / `vpdpwssd` with the
int16 sub-block scale of each pair (int8 q6_K scales) sum `scale * q * x` exactly into int32
lanes: S. q4_K/q5_K: the 4-byte runs of pieces 0 and 1 (and of 2 and 3) are interleaved once
per row and super-block (`vpunpckldq` / `vpunpckhdq` per 16-byte lane: runs (0, 4k), (1, 4k),
(0, 4k + 1), (1, 4k + 1) in lane k of the first vector, runs 4k + 2, 4k + 3 in the second), the
activation stored in that order (`activation_k.K4_ORDER`). On AVX-512 VNNI, per token and half
super-block, one `vpdpbusd` per vector sums each run (at most 4 * 31 * 127, fits int16), one
`vpackssdw` packs the two vectors' run sums to words, which puts the runs of pieces 0 and 1 at
one piece position side by side, and one `vpdpwssd` with the 6-bit scales adds them: 6 multiplying
instructions per super-block and token instead of 8, and int32 lane j holds exactly the sum
`vpmaddubsw` + `vpdpwssd` on the un-interleaved pieces gave (runs j of the four pieces), so the
float32 results are those of that kernel, bit for bit. On AVX2, `vpmaddubsw` + `vpmaddwd` on the
interleaved vectors (a scale per byte pair), as for q6_K. The rest comes from the activation's
block sums, per token and super-block: q6_K `C = sum_j scale_j * sum(x_j)` (16-element runs,
int16 sums, one `vpmaddwd`) subtracted in integers; q4_K/q5_K the 8 floats `d_x * sum(x_j)`
(32-element runs, made with the activation) times the row's `-dmin * min_j`, one 8-lane FMA into
an accumulator of their own. So a super-block's contribution is

    q4_K, q5_K:  d * d_x * S - sum_j (dmin * min_j) * (d_x * sum(x_j))      q6_K:  d * d_x * (S - 32 * C)

with exact integers S, C; the int32 lanes go to float32 and are fused-multiply-added, times
d * d_x, into one float vector per (row, token), summed at the end (with the mins' vector). The
unpacked pieces, spread scales and decoded 6-bit scales and mins of a row's super-block are
made once and shared by the call's tokens; the row's bytes are prefetched 4 KiB ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mer.quant import vector_ir as vir

PIECES = 4
PIECE_BYTES = 64
PREFETCH_BYTES = 4096
WIDTHS = (32, 64)


@dataclass(frozen=True)
class SuperBlockFormat:
    """Byte offsets inside one GGUF super-block."""

    block_bytes: int
    quants_at: int
    high_bits_at: int | None
    scales_at: int
    d_at: int
    dmin_at: int | None


FORMATS = {
    "q4_k": SuperBlockFormat(144, quants_at=16, high_bits_at=None, scales_at=4, d_at=0, dmin_at=2),
    "q5_k": SuperBlockFormat(176, quants_at=48, high_bits_at=16, scales_at=4, d_at=0, dmin_at=2),
    "q6_k": SuperBlockFormat(210, quants_at=0, high_bits_at=128, scales_at=192, d_at=208, dmin_at=None),
}


def _bytes(width: int, value: int) -> ir.Constant:
    return ir.Constant(vir.vector(vir.INT8, width), [value] * width)


def _byte_pair_products(builder: ir.IRBuilder, unsigned: ir.Value, signed: ir.Value) -> ir.Value:
    """`vpmaddubsw`: int16 lane i = u[2i] * s[2i] + u[2i+1] * s[2i+1] (saturating)."""
    count = unsigned.type.count
    name = "llvm.x86.avx512.pmaddubs.w.512" if count == 64 else "llvm.x86.avx2.pmadd.ub.sw"
    function_type = ir.FunctionType(vir.vector(vir.INT16, count // 2), [unsigned.type, signed.type])
    function = cgutils.get_or_insert_function(builder.module, function_type, name)
    return builder.call(function, [unsigned, signed])


def _word_pair_products(builder: ir.IRBuilder, first: ir.Value, second: ir.Value) -> ir.Value:
    """`vpmaddwd`: int32 lane i = a[2i] * b[2i] + a[2i+1] * b[2i+1] (exact)."""
    count = first.type.count
    name = "llvm.x86.avx512.pmaddw.d.512" if count == 32 else "llvm.x86.avx2.pmadd.wd"
    function_type = ir.FunctionType(vir.vector(vir.INT32, count // 2), [first.type, second.type])
    function = cgutils.get_or_insert_function(builder.module, function_type, name)
    return builder.call(function, [first, second])


def _add_word_pair_products(builder: ir.IRBuilder, total: ir.Value, first: ir.Value, second: ir.Value) -> ir.Value:
    """`total + vpmaddwd(first, second)`; one `vpdpwssd` on 512-bit vectors (AVX-512 VNNI)."""
    if first.type.count != 32:
        return builder.add(total, _word_pair_products(builder, first, second))
    lanes = vir.vector(vir.INT32, 16)
    function_type = ir.FunctionType(lanes, [lanes, lanes, lanes])
    function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.x86.avx512.vpdpwssd.512")
    return builder.call(function, [total, builder.bitcast(first, lanes), builder.bitcast(second, lanes)])


def _pack_words(builder: ir.IRBuilder, first: ir.Value, second: ir.Value) -> ir.Value:
    """`vpackssdw` (512-bit): per 16-byte lane k, the int32 lanes 4k ... 4k + 3 of `first`, then
    those of `second`, as int16 (saturating; the run sums packed here always fit)."""
    lanes, words = vir.vector(vir.INT32, 16), vir.vector(vir.INT16, 32)
    function_type = ir.FunctionType(words, [lanes, lanes])
    function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.x86.avx512.packssdw.512")
    return builder.call(function, [first, second])


def _interleave_runs(builder: ir.IRBuilder, first: ir.Value, second: ir.Value, high: bool) -> ir.Value:
    """`vpunpckldq` (`high`: `vpunpckhdq`) of two byte vectors: per 16-byte lane, the 4-byte runs
    0, 1 (2, 3) of `first` and `second` alternating."""
    count = first.type.count // 4
    dwords = vir.vector(vir.INT32, count)
    start = 2 if high else 0
    indices = [source for lane in range(count // 4) for run in (start, start + 1)
               for source in (4 * lane + run, count + 4 * lane + run)]
    mixed = builder.shuffle_vector(builder.bitcast(first, dwords), builder.bitcast(second, dwords),
                                   ir.Constant(vir.vector(vir.INT32, count), indices))
    return builder.bitcast(mixed, first.type)


def _k4_run_source(half: int, vector: int, byte: int) -> tuple[int, int]:
    """(piece, byte in the piece) of byte `byte` (0..63) of interleaved vector `vector` (0: the
    `vpunpckldq` one, 1: the `vpunpckhdq` one) of super-block half `half`: the inverse of the
    run interleave (`activation_k.k4_activation_position`)."""
    lane, slot, run_byte = byte // 16, (byte // 4) % 4, byte % 4
    return 2 * half + slot % 2, 4 * (4 * lane + 2 * vector + slot // 2) + run_byte


@dataclass
class _PreparedBlock:
    """One row's super-block, unpacked once for every token."""

    vectors: list[ir.Value]  # unsigned quant bytes, piece-major, `width` bytes each
    scales: list[ir.Value]  # per vector: the int16 scale of each of its byte pairs
    d: ir.Value  # splat over the float lanes
    offsets: ir.Value  # q6_K: 16 x i16 scales (of the 16-element sums); q4_K/q5_K: 8 floats -dmin * min_j


class _KDotEmitter:
    """Emits the IR of one `kquant_dot` call."""

    def __init__(self, context, builder, signature, args, dtype: str, width: int, num_rows: int, num_tokens: int):  # type: ignore[no-untyped-def]
        self.builder = builder
        self.dtype = dtype
        self.format = FORMATS[dtype]
        self.width = width
        self.num_tokens = num_tokens
        weights, position, quants, sums, scales, token_start = args[:6]
        offset, row_stride, num_blocks = cgutils.unpack_tuple(builder, position)
        self.num_blocks = num_blocks
        self.row_offsets = [builder.add(offset, builder.mul(row_stride, vir.INT64(row))) for row in range(num_rows)]
        self.token_start = token_start
        weights_array, quants_array, sums_array, scales_array = (
            context.make_array(signature.args[number])(context, builder, value)
            for number, value in ((0, weights), (2, quants), (3, sums), (4, scales))
        )
        self.weights = builder.bitcast(weights_array.data, vir.INT8.as_pointer())
        self.batch = cgutils.unpack_tuple(builder, quants_array.shape)[1]
        self.quants = builder.bitcast(quants_array.data, vir.INT8.as_pointer())
        self.sums = builder.bitcast(sums_array.data, vir.INT16.as_pointer())
        self.scales = builder.bitcast(scales_array.data, vir.FLOAT.as_pointer())

    # ---- the weight side -------------------------------------------------------------------

    def _load(self, base: ir.Value, at: int, vector_type: ir.VectorType) -> ir.Value:
        """An unaligned vector load from byte `base + at` of the weights."""
        builder = self.builder
        return vir.load_vector(builder, builder.gep(self.weights, [builder.add(base, vir.INT64(at))]), vector_type)

    def _half(self, base: ir.Value, at: int) -> ir.Value:
        return vir.float32_from_float16_bits(self.builder, self._load(base, at, vir.vector(vir.INT16, 1)))

    def _high_bits(self, base: ir.Value, at: int) -> ir.Value:
        """32 bytes of `qh` at `at`, repeated to fill a vector of `width` bytes."""
        loaded = self._load(base, at, vir.vector(vir.INT8, 32))
        if self.width == 32:
            return loaded
        indices = ir.Constant(vir.vector(vir.INT32, self.width), [lane % 32 for lane in range(self.width)])
        return self.builder.shuffle_vector(loaded, loaded, indices)

    def _piece_vectors(self, base: ir.Value, piece: int) -> list[ir.Value]:
        """The unsigned quants of `piece` (0..3), as 64 / width vectors."""
        builder, fmt, width = self.builder, self.format, self.width
        vectors = []
        for part in range(PIECE_BYTES // width):
            source = fmt.quants_at + PIECE_BYTES * (piece // 2) + width * part
            raw = self._load(base, source, vir.vector(vir.INT8, width))
            nibbles = builder.and_(raw, _bytes(width, 0x0F)) if piece % 2 == 0 else builder.lshr(raw, _bytes(width, 4))
            if self.dtype == "q5_k":
                masks = [1 << self._k4_sub_block(piece, width * part + lane) for lane in range(width)]
                bits = builder.and_(self._high_bits(base, fmt.high_bits_at), ir.Constant(nibbles.type, masks))
                is_set = builder.icmp_unsigned("!=", bits, ir.Constant(nibbles.type, None))
                nibbles = builder.or_(nibbles, builder.select(is_set, _bytes(width, 16), _bytes(width, 0)))
            elif self.dtype == "q6_k":
                high = self._high_bits(base, fmt.high_bits_at + 32 * (piece // 2))
                words = vir.vector(vir.INT16, width // 2)
                shifts = [4 * (piece % 2) + 2 * ((width * part + 2 * lane) // 32) for lane in range(width // 2)]
                shifted = builder.lshr(builder.bitcast(high, words), ir.Constant(words, shifts))
                top = builder.and_(builder.bitcast(shifted, nibbles.type), _bytes(width, 3))
                nibbles = builder.or_(nibbles, builder.shl(top, _bytes(width, 4)))
            vectors.append(nibbles)
        return vectors

    @staticmethod
    def _k4_sub_block(piece: int, piece_byte: int) -> int:
        """The 32-element sub-block (0..7) of byte `piece_byte` of a q4_K / q5_K piece."""
        chunk = 2 * (piece // 2) + piece_byte // 32
        return 2 * chunk + piece % 2

    def _k4_scales_and_mins(self, base: ir.Value) -> ir.Value:
        """The eight 6-bit scales, then the eight 6-bit mins, of a q4_K / q5_K super-block, as
        16 x i16, unpacked with a few 16-byte vector operations.

        Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7, bytes 4-7
        the mins likewise, bytes 8-11 the low 4 bits of scales 4-7 (low nibbles) and mins
        4-7 (high nibbles). The load's bytes 12-15 are the block's first quants, unused."""
        builder = self.builder
        byte_vector = vir.vector(vir.INT8, 16)
        packed = self._load(base, self.format.scales_at, byte_vector)
        high_nibbles = builder.lshr(packed, ir.Constant(byte_vector, [4] * 16))
        top_bits = builder.lshr(packed, ir.Constant(byte_vector, [6] * 16))
        low_sources = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 24, 25, 26, 27]  # 16+: from high_nibbles
        low = builder.shuffle_vector(packed, high_nibbles, ir.Constant(vir.vector(vir.INT32, 16), low_sources))
        low = builder.and_(low, ir.Constant(byte_vector, [63] * 4 + [15] * 4 + [63] * 4 + [15] * 4))
        top_sources = [16, 16, 16, 16, 0, 1, 2, 3, 16, 16, 16, 16, 4, 5, 6, 7]  # 16: a zero byte
        top = builder.shuffle_vector(top_bits, ir.Constant(byte_vector, None), ir.Constant(vir.vector(vir.INT32, 16), top_sources))
        combined = builder.or_(low, builder.shl(top, ir.Constant(byte_vector, [4] * 16)))
        return builder.zext(combined, vir.vector(vir.INT16, 16))

    def _spread(self, values: ir.Value, indices: list[int]) -> ir.Value:
        return self.builder.shuffle_vector(values, values, ir.Constant(vir.vector(vir.INT32, len(indices)), indices))

    def _prepare(self, row_offset: ir.Value, block: ir.Value) -> _PreparedBlock:
        builder, fmt, width = self.builder, self.format, self.width
        base = builder.add(row_offset, builder.mul(block, vir.INT64(fmt.block_bytes)))
        vir.prefetch(builder, builder.gep(self.weights, [builder.add(base, vir.INT64(PREFETCH_BYTES))]))
        vectors, scales = [], []
        if self.dtype == "q6_k":
            block_scales = builder.sext(self._load(base, fmt.scales_at, vir.vector(vir.INT8, 16)), vir.vector(vir.INT16, 16))
            offsets = block_scales
        else:
            block_scales = self._k4_scales_and_mins(base)  # scales in lanes 0-7, mins in 8-15
            mins = builder.sitofp(vir.lanes(builder, block_scales, 8, 8), vir.vector(vir.FLOAT, 8))
            minus_dmin = builder.fneg(builder.extract_element(self._half(base, fmt.dmin_at), vir.INT32(0)))
            offsets = builder.fmul(mins, vir.splat(builder, minus_dmin, 8))
        pieces = [self._piece_vectors(base, piece) for piece in range(PIECES)]
        parts = PIECE_BYTES // width
        if self.dtype == "q6_k":
            for piece in range(PIECES):
                vectors.extend(pieces[piece])
                for part in range(parts):
                    pair_bytes = [width * part + 2 * lane for lane in range(width // 2)]
                    indices = [8 * (piece // 2) + (64 * (piece % 2) + byte) // 16 for byte in pair_bytes]
                    scales.append(self._spread(block_scales, indices))
        else:  # each half's two pieces with their 4-byte runs interleaved (the activation's order)
            for half in range(2):
                for vector, high in ((0, False), (1, True)):
                    for part in range(parts):
                        vectors.append(_interleave_runs(builder, pieces[2 * half][part], pieces[2 * half + 1][part], high))
                        if width != 64:  # AVX2: a scale per byte pair of the vector
                            pair_bytes = [width * part + 2 * lane for lane in range(width // 2)]
                            sources = [_k4_run_source(half, vector, byte) for byte in pair_bytes]
                            scales.append(self._spread(block_scales, [self._k4_sub_block(*source) for source in sources]))
                if width == 64:  # VNNI: a scale per word of the half's two vectors' packed run sums
                    sources = [_k4_run_source(half, (word % 8) // 4, 4 * (4 * (word // 8) + word % 4))
                               for word in range(32)]
                    scales.append(self._spread(block_scales, [self._k4_sub_block(*source) for source in sources]))
        d = builder.extract_element(self._half(base, fmt.d_at), vir.INT32(0))
        return _PreparedBlock(vectors, scales, vir.splat(builder, d, width // 4), offsets)

    # ---- the token side --------------------------------------------------------------------

    def _widen_lanes(self, values: ir.Value) -> ir.Value:
        """8 x i32 as the int32 lanes of a `width` vector (zeros above)."""
        count = self.width // 4
        if count == 8:
            return values
        indices = ir.Constant(vir.vector(vir.INT32, count), list(range(count)))
        return self.builder.shuffle_vector(values, ir.Constant(values.type, None), indices)

    def _add_token(self, prepared: _PreparedBlock, index: ir.Value, d_x: ir.Value, accumulators: tuple) -> None:
        """Add one token's super-block to its accumulators (`d_x`: its scale, splat; the
        accumulators: the scale products', and for q4_K/q5_K the mins' 8 float lanes)."""
        builder, width = self.builder, self.width
        count = width // 4
        lanes = vir.vector(vir.INT32, count)
        floats = vir.vector(vir.FLOAT, count)
        quants_at = builder.mul(index, vir.INT64(256))
        total = ir.Constant(lanes, None)
        activations = []
        for number in range(len(prepared.vectors)):
            pointer = builder.gep(self.quants, [builder.add(quants_at, vir.INT64(width * number))])
            activations.append(vir.load_vector(builder, pointer, vir.vector(vir.INT8, width)))
        if width == 64 and self.format.dmin_at is not None:  # q4_K/q5_K on VNNI: runs, packed, scaled
            for half, scale in enumerate(prepared.scales):
                runs = [vir.dot_unsigned_signed_bytes(builder, ir.Constant(lanes, None), prepared.vectors[number],
                                                      activations[number]) for number in (2 * half, 2 * half + 1)]
                total = _add_word_pair_products(builder, total, _pack_words(builder, *runs), scale)
        else:
            for vector, activation, scale in zip(prepared.vectors, activations, prepared.scales):
                total = _add_word_pair_products(builder, total, _byte_pair_products(builder, vector, activation), scale)
        if self.format.dmin_at is None:  # q6_K: all in integers, S - 32 C
            sums_at = builder.gep(self.sums, [builder.mul(index, vir.INT64(16))])
            sums = vir.load_vector(builder, sums_at, vir.vector(vir.INT16, 16))
            correction = self._widen_lanes(_word_pair_products(builder, sums, prepared.offsets))
            total = builder.sub(total, builder.shl(correction, ir.Constant(lanes, [5] * count)))
        else:  # q4_K/q5_K: -dmin * min_j times the token's d_x * (sum of run j)
            run_sums_at = builder.gep(self.scales, [builder.add(builder.mul(index, vir.INT64(9)), vir.INT64(1))])
            run_sums = vir.load_vector(builder, run_sums_at, vir.vector(vir.FLOAT, 8))
            mins_total = vir.multiply_add(builder, prepared.offsets, run_sums, builder.load(accumulators[1]))
            builder.store(mins_total, accumulators[1])
        factor = builder.fmul(prepared.d, d_x)
        result = vir.multiply_add(builder, builder.sitofp(total, floats), factor, builder.load(accumulators[0]))
        builder.store(result, accumulators[0])

    def emit(self, context, return_type) -> ir.Value:  # type: ignore[no-untyped-def]
        builder = self.builder
        kinds = [vir.vector(vir.FLOAT, self.width // 4)]
        if self.format.dmin_at is not None:
            kinds.append(vir.vector(vir.FLOAT, 8))
        accumulators = []
        for _ in self.row_offsets:
            row_accumulators = []
            for _ in range(self.num_tokens):
                pair = tuple(cgutils.alloca_once(builder, kind) for kind in kinds)
                for accumulator, kind in zip(pair, kinds):
                    builder.store(ir.Constant(kind, None), accumulator)
                row_accumulators.append(pair)
            accumulators.append(row_accumulators)
        with cgutils.for_range(builder, self.num_blocks) as loop:
            block = loop.index
            prepared = [self._prepare(row_offset, block) for row_offset in self.row_offsets]
            first = builder.add(builder.mul(block, self.batch), self.token_start)
            for token in range(self.num_tokens):
                index = builder.add(first, vir.INT64(token))
                d_x_at = builder.gep(self.scales, [builder.mul(index, vir.INT64(9))])
                d_x = vir.splat(builder, builder.load(d_x_at), self.width // 4)
                for row, row_block in enumerate(prepared):
                    self._add_token(row_block, index, d_x, accumulators[row][token])
        sums = []
        for row in accumulators:
            for pair in row:
                totals = [vir.horizontal_sum(builder, builder.load(accumulator)) for accumulator in pair]
                sums.append(totals[0] if len(totals) == 1 else builder.fadd(totals[0], totals[1]))
        return context.make_tuple(builder, return_type, sums)


@intrinsic(prefer_literal=True)
def kquant_dot(typingctx, weights, position, quants, sums, scales, token_start, dtype, width, num_rows, num_tokens):  # type: ignore[no-untyped-def]
    """See the module docstring; dtype, width, num_rows and num_tokens must be literals."""
    literals = ((dtype, types.StringLiteral), (width, types.IntegerLiteral),
                (num_rows, types.IntegerLiteral), (num_tokens, types.IntegerLiteral))
    if not all(isinstance(value, kind) for value, kind in literals):
        return None
    dtype_name, vector_width = dtype.literal_value, width.literal_value
    row_count, token_count = num_rows.literal_value, num_tokens.literal_value
    if dtype_name not in FORMATS or vector_width not in WIDTHS or row_count < 1 or token_count < 1:
        return None
    arrays = ((weights, 1), (quants, 3), (sums, 3), (scales, 3))
    if any(not isinstance(array, types.Array) or array.layout != "C" or array.ndim != ndim for array, ndim in arrays):
        return None  # the IR addresses the arrays' bytes directly
    signature = types.UniTuple(types.float32, row_count * token_count)(
        weights, types.UniTuple(types.int64, 3), quants, sums, scales, types.int64, dtype, width, num_rows, num_tokens
    )

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        emitter = _KDotEmitter(context, builder, signature, args, dtype_name, vector_width, row_count, token_count)
        return emitter.emit(context, signature.return_type)

    return signature, codegen
