"""LLVM vector IR building blocks for the numba intrinsics of the q4_0 and q8_0 kernels.

numba has no vector types, so the hot loops of `mer.quant.kernels_vnni` and
`mer.quant.kernels_avx2` are written as LLVM IR with these helpers: vector loads (plain or
masked), the AVX-512 VNNI byte dot product `vpdpbusd` (unsigned bytes times signed bytes, four
adjacent products summed into each int32 lane), its AVX2 parts `vpmaddubsw` / `vpmaddwd` /
`vpsignb`, f16 to f32 widening and horizontal sums. Each set of IR is only emitted when the CPU
numba compiles for has its instructions (`has_vnni_kernels()`, `has_avx2_kernels()`); elsewhere
the portable numba kernels run.
"""

from __future__ import annotations

from functools import lru_cache

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba.core import cgutils
from numba.core import config as numba_config

INT1 = ir.IntType(1)
INT8 = ir.IntType(8)
INT16 = ir.IntType(16)
INT32 = ir.IntType(32)
INT64 = ir.IntType(64)
FLOAT = ir.FloatType()
HALF = ir.HalfType()
REQUIRED_CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "f16c")
AVX2_CPU_FEATURES = ("avx2", "fma", "f16c")


def _compiles_for(required: tuple[str, ...]) -> bool:
    """True when the CPU numba compiles for has every feature of `required`: the host CPU, or
    the one named by NUMBA_CPU_NAME / NUMBA_CPU_FEATURES."""
    if numba_config.CPU_NAME not in (None, "host"):
        enabled = {flag[1:] for flag in (numba_config.CPU_FEATURES or "").split(",") if flag.startswith("+")}
        return all(name in enabled for name in required)
    features = llvm_binding.get_host_cpu_features()
    return all(features.get(name, False) for name in required)


@lru_cache(maxsize=1)
def has_vnni_kernels() -> bool:
    """True when numba compiles for a CPU with AVX-512 BW + VNNI + F16C (the fastest q4_0/q8_0
    kernels, `mer.quant.kernels_vnni`)."""
    return _compiles_for(REQUIRED_CPU_FEATURES)


@lru_cache(maxsize=1)
def has_avx2_kernels() -> bool:
    """True when numba compiles for a CPU with AVX2 + FMA + F16C (`mer.quant.kernels_avx2`)."""
    return _compiles_for(AVX2_CPU_FEATURES)


def fastest_kernel() -> str:
    """The q4_0/q8_0 kernel `kernel="auto"` runs here: "vnni", else "avx2", else "portable"."""
    if has_vnni_kernels():
        return "vnni"
    return "avx2" if has_avx2_kernels() else "portable"


def vector(element: ir.Type, count: int) -> ir.VectorType:
    return ir.VectorType(element, count)


def splat(builder: ir.IRBuilder, value: ir.Value, count: int) -> ir.Value:
    """A vector of `count` copies of a scalar."""
    single = builder.insert_element(ir.Constant(vector(value.type, 1), None), value, INT32(0))
    return builder.shuffle_vector(single, single, ir.Constant(vector(INT32, count), [0] * count))


def load_vector(builder: ir.IRBuilder, pointer: ir.Value, vector_type: ir.VectorType) -> ir.Value:
    """An unaligned load of a whole vector from `pointer`."""
    return builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=1)


def _intrinsic_type_name(vector_type: ir.VectorType) -> str:
    element = vector_type.element
    if isinstance(element, ir.IntType):
        name = f"i{element.width}"
    elif isinstance(element, ir.HalfType):
        name = "f16"
    else:
        name = "f32"
    return f"v{vector_type.count}{name}"


def masked_load_vector(
    builder: ir.IRBuilder, pointer: ir.Value, vector_type: ir.VectorType, mask: ir.Value
) -> ir.Value:
    """Load the lanes of `vector_type` where `mask` is set, zero elsewhere; never touches the
    memory of the masked-off lanes (so it may run past the end of a buffer)."""
    type_name = _intrinsic_type_name(vector_type)
    function_type = ir.FunctionType(
        vector_type, [vector_type.as_pointer(), INT32, vector(INT1, vector_type.count), vector_type]
    )
    function = cgutils.get_or_insert_function(
        builder.module, function_type, f"llvm.masked.load.{type_name}.p0"
    )
    typed_pointer = builder.bitcast(pointer, vector_type.as_pointer())
    return builder.call(function, [typed_pointer, INT32(1), mask, ir.Constant(vector_type, None)])


def lanes_below(builder: ir.IRBuilder, count: int, limit: ir.Value) -> ir.Value:
    """An i1 mask of `count` lanes, lane i set when i < limit (limit an i64)."""
    lane_numbers = ir.Constant(vector(INT64, count), list(range(count)))
    return builder.icmp_unsigned("<", lane_numbers, splat(builder, limit, count))


def dot_unsigned_signed_bytes(
    builder: ir.IRBuilder, accumulator: ir.Value, unsigned_bytes: ir.Value, signed_bytes: ir.Value
) -> ir.Value:
    """`vpdpbusd`: accumulator (16 x i32) + per lane the sum of four u8 * s8 products.

    Lane i of the result adds `u[4i + k] * s[4i + k]` for k = 0..3 to lane i of the accumulator.
    """
    lanes = vector(INT32, 16)
    function_type = ir.FunctionType(lanes, [lanes, lanes, lanes])
    function = cgutils.get_or_insert_function(
        builder.module, function_type, "llvm.x86.avx512.vpdpbusd.512"
    )
    return builder.call(
        function,
        [accumulator, builder.bitcast(unsigned_bytes, lanes), builder.bitcast(signed_bytes, lanes)],
    )


def _call_intrinsic(
    builder: ir.IRBuilder, name: str, result_type: ir.Type, arguments: list[ir.Value]
) -> ir.Value:
    function_type = ir.FunctionType(result_type, [argument.type for argument in arguments])
    function = cgutils.get_or_insert_function(builder.module, function_type, name)
    return builder.call(function, arguments)


def multiply_add_unsigned_signed_bytes(
    builder: ir.IRBuilder, unsigned_bytes: ir.Value, signed_bytes: ir.Value
) -> ir.Value:
    """AVX2 `vpmaddubsw` (32 x i8 each): 16 x i16, lane i = u[2i] * s[2i] + u[2i+1] * s[2i+1],
    SATURATED to int16: exact only when each pair sum fits in [-32768, 32767]."""
    result = vector(INT16, 16)
    return _call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", result, [unsigned_bytes, signed_bytes])


def sum_word_pairs(builder: ir.IRBuilder, words: ir.Value) -> ir.Value:
    """AVX2 `vpmaddwd` with ones: 16 x i16 -> 8 x i32, lane i = w[2i] + w[2i+1] (exact)."""
    ones = ir.Constant(vector(INT16, 16), [1] * 16)
    return _call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", vector(INT32, 8), [words, ones])


def add_adjacent_pairs(builder: ir.IRBuilder, first: ir.Value, second: ir.Value) -> ir.Value:
    """AVX2 `vphaddw` (16 x i16) or `vphaddd` (8 x i32), wrapping: per 128-bit half, the sums
    of adjacent lane pairs of `first`'s half, then those of `second`'s half."""
    width = first.type.element.width
    name = "llvm.x86.avx2.phadd.w" if width == 16 else "llvm.x86.avx2.phadd.d"
    return _call_intrinsic(builder, name, first.type, [first, second])


def copy_sign_bytes(builder: ir.IRBuilder, values: ir.Value, signs: ir.Value) -> ir.Value:
    """AVX2 `vpsignb` (32 x i8): values[i] negated where signs[i] < 0, zero where it is 0."""
    return _call_intrinsic(builder, "llvm.x86.avx2.psign.b", values.type, [values, signs])


def absolute_bytes(builder: ir.IRBuilder, values: ir.Value) -> ir.Value:
    """|values| per i8 lane (`vpabsb`); -128 stays 0x80, i.e. 128 read as unsigned."""
    name = f"llvm.abs.{_intrinsic_type_name(values.type)}"
    return _call_intrinsic(builder, name, values.type, [values, ir.Constant(INT1, 0)])


def lanes(builder: ir.IRBuilder, values: ir.Value, start: int, count: int) -> ir.Value:
    """`count` consecutive lanes of `values` from `start`, as a vector."""
    indices = ir.Constant(vector(INT32, count), list(range(start, start + count)))
    return builder.shuffle_vector(values, values, indices)


def shuffle_bytes(builder: ir.IRBuilder, table: ir.Value, indices: ir.Value) -> ir.Value:
    """`vpshufb` on 64 (AVX-512) or 32 (AVX2) bytes: each byte of `indices` (0-15) picks a byte of
    its 16-byte lane of `table`."""
    name = "llvm.x86.avx512.pshuf.b.512" if table.type.count == 64 else "llvm.x86.avx2.pshuf.b"
    return _call_intrinsic(builder, name, table.type, [table, indices])


def float32_from_e8m0_half(builder: ir.IRBuilder, exponents: ir.Value) -> ir.Value:
    """MXFP4's E8M0 scale bytes (i8 lanes) as float32 half-scales `2^(e - 128)`, as ggml's
    `e8m0_to_fp32_half`: the bits `(e - 1) << 23`, or `0x00200000 << e` (a subnormal) for e < 2."""
    count = exponents.type.count
    words_type = vector(INT32, count)
    words = builder.zext(exponents, words_type)
    normal = builder.shl(builder.sub(words, ir.Constant(words_type, [1] * count)), ir.Constant(words_type, [23] * count))
    subnormal = builder.shl(ir.Constant(words_type, [0x00200000] * count), words)
    is_small = builder.icmp_unsigned("<", words, ir.Constant(words_type, [2] * count))
    return builder.bitcast(builder.select(is_small, subnormal, normal), vector(FLOAT, count))


def float32_from_float16_bits(builder: ir.IRBuilder, halves: ir.Value) -> ir.Value:
    """Widen a vector of f16 bit patterns (i16 lanes) to float32 lanes (exact)."""
    count = halves.type.count
    return builder.fpext(builder.bitcast(halves, vector(HALF, count)), vector(FLOAT, count))


def repeat_lanes(builder: ir.IRBuilder, values: ir.Value, times: int) -> ir.Value:
    """Each lane of `values` repeated `times` times in a row: [a, b] -> [a, a, b, b] for 2."""
    count = values.type.count
    indices = [lane // times for lane in range(count * times)]
    return builder.shuffle_vector(values, values, ir.Constant(vector(INT32, len(indices)), indices))


def horizontal_sum(builder: ir.IRBuilder, values: ir.Value) -> ir.Value:
    """Sum of the float lanes of `values` by halving (the count must be a power of two)."""
    count = values.type.count
    while count > 1:
        half = count // 2
        low = builder.shuffle_vector(values, values, ir.Constant(vector(INT32, half), list(range(half))))
        high = builder.shuffle_vector(
            values, values, ir.Constant(vector(INT32, half), list(range(half, count)))
        )
        values = builder.fadd(low, high)
        count = half
    return builder.extract_element(values, INT32(0))


def multiply_add(builder: ir.IRBuilder, left: ir.Value, right: ir.Value, addend: ir.Value) -> ir.Value:
    """`left * right + addend`, fused (one rounding) via llvm.fma."""
    vector_type = left.type
    function_type = ir.FunctionType(vector_type, [vector_type] * 3)
    function = cgutils.get_or_insert_function(
        builder.module, function_type, f"llvm.fma.{_intrinsic_type_name(vector_type)}"
    )
    return builder.call(function, [left, right, addend])


def concatenate(builder: ir.IRBuilder, pieces: list[ir.Value]) -> ir.Value:
    """Equal vectors joined end to end (a power-of-two count of them)."""
    while len(pieces) > 1:
        count = pieces[0].type.count
        indices = ir.Constant(vector(INT32, 2 * count), list(range(2 * count)))
        pieces = [
            builder.shuffle_vector(pieces[index], pieces[index + 1], indices)
            for index in range(0, len(pieces), 2)
        ]
    return pieces[0]


def prefetch(builder: ir.IRBuilder, pointer: ir.Value) -> None:
    """Hint the CPU to bring the cache line at `pointer` (an i8*) into its caches for reading."""
    function_type = ir.FunctionType(ir.VoidType(), [INT8.as_pointer(), INT32, INT32, INT32])
    function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
    builder.call(function, [pointer, INT32(0), INT32(3), INT32(1)])
