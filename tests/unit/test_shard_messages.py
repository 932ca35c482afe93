"""The remote shards' wire format: a per-layer request and its result round-trip exactly; f32 is bit-exact,
f16 is numpy's float16 conversion (and halves the array bytes); bad requests and results are refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from mer.cluster.wire_precision import from_wire, to_wire, wire_dtype_of
from mer.errors import ProtocolError
from mer.protocol import ShardLayerRequest, ShardLayerResult, decode, encode

SEED = 7


def hidden(rows: int = 5, d_model: int = 64, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, d_model), dtype=np.float32) * 3.0


def awkward_f32() -> np.ndarray:
    """Values an exact transport must keep bit for bit: NaN with a payload, -0.0, subnormals, inf, extremes."""
    bits = np.array([0x7FC01234, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x3F800001],
                    dtype=np.uint32)
    return bits.view(np.float32).reshape(1, 8)


def sent_and_received(message):
    frames = encode(message)
    return frames, decode([bytes(frame) for frame in frames])


def test_f32_request_and_result_round_trip_bit_exactly():
    x = np.concatenate([hidden(rows=3, d_model=8), awkward_f32()])
    request = ShardLayerRequest(41, 17, 2, [0, 5, 7], [0, 1, 3, 4], to_wire(x, "f32"))
    frames, received = sent_and_received(request)
    assert type(received) is ShardLayerRequest
    assert (received.request_id, received.token, received.moe_layer) == (41, 17, 2)
    assert received.experts == [0, 5, 7] and received.row_offsets == [0, 1, 3, 4]
    assert from_wire(received.x).view(np.uint32).tobytes() == x.view(np.uint32).tobytes()
    assert len(frames) == 3 and bytes(frames[2]) == x.tobytes()  # the hidden states are one raw frame

    result = ShardLayerResult(41, 1, to_wire(np.negative(x), "f32"), 99.25)
    _, answer = sent_and_received(result)
    answer.check_answers(received)
    assert from_wire(answer.outputs).tobytes() == np.negative(x).tobytes()
    assert (answer.shard, answer.compute_us) == (1, 99.25)


def test_f16_is_numpys_float16_conversion_and_halves_the_bytes():
    x = hidden(rows=6, d_model=32)
    request = ShardLayerRequest(1, 0, 0, [3], [0, 6], to_wire(x, "f16"))
    frames, received = sent_and_received(request)
    assert received.x.dtype == np.float16 and wire_dtype_of(received.x) == "f16"
    widened = from_wire(received.x)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, x.astype(np.float16).astype(np.float32))  # exactly numpy's rounding
    assert len(bytes(frames[2])) == x.nbytes // 2
    normal = np.abs(x) >= 2.0 ** -14
    assert np.all(np.abs(widened - x)[normal] <= np.abs(x)[normal] * 2.0 ** -11)  # half an ulp of float16
    assert not np.array_equal(widened, x)  # f16 is not exact: the option trades exactness for bytes
    assert msgpack.unpackb(frames[1])[5]["dtype"] == "<f2"

    result = ShardLayerResult(1, 0, to_wire(x, "f16"), 1.0)
    result.check_answers(received)
    with pytest.raises(ProtocolError, match=r"outputs float32 \[6, 32\], the request's x is float16 \[6, 32\]"):
        ShardLayerResult(1, 0, to_wire(x, "f32"), 1.0).check_answers(received)


def test_f16_values_below_its_range_round_like_numpy_and_overflow_is_an_error():
    x = np.array([[1e-8, -3e-6, 65504.0, 65519.0, 7e-5]], dtype=np.float32)
    np.testing.assert_array_equal(to_wire(x, "f16"), x.astype(np.float16))
    assert to_wire(x, "f16")[0, 0] == 0.0 and to_wire(x, "f16")[0, 3] == 65504.0
    too_big = np.array([[1.0, 70000.0, -1e6, np.inf]], dtype=np.float32)
    with pytest.raises(ProtocolError, match=r"2 values do not fit float16 \(largest magnitude 1e\+06 > 65504\): send them as f32"):
        to_wire(too_big, "f16")
    assert np.isinf(to_wire(np.array([[np.inf]], dtype=np.float32), "f16")[0, 0])  # inf stays inf, not an overflow


def test_bad_wire_dtypes_are_refused():
    with pytest.raises(ProtocolError, match=r"wire dtype 'bf16' is not one of f32, f16"):
        to_wire(hidden(), "bf16")
    with pytest.raises(ProtocolError, match="to_wire takes float32 values, got float64"):
        to_wire(hidden().astype(np.float64), "f32")
    with pytest.raises(ProtocolError, match="from_wire takes float32 or float16 values, got float64"):
        from_wire(np.zeros((1, 2)))
    with pytest.raises(ProtocolError, match=r"ShardLayerRequest\.x: expected a float32 or float16 array \[rows, d_model\], got float64"):
        encode(ShardLayerRequest(1, 0, 0, [3], [0, 5], hidden().astype(np.float64)))


def test_a_reference_with_another_dtype_is_refused_on_receipt():
    frames = [bytes(frame) for frame in encode(ShardLayerRequest(1, 0, 0, [3], [0, 5], hidden()))]
    body = msgpack.unpackb(frames[1])
    body[5]["dtype"] = "<f8"
    body[5]["shape"] = [5, 32]
    with pytest.raises(ProtocolError, match=r"ShardLayerRequest\.x\.dtype: expected dtype '<f4' or '<f2' \(float32 or float16\)"):
        decode([frames[0], msgpack.packb(body), frames[2]])
    body[5]["dtype"], body[5]["shape"] = "<f2", [5, 64]  # f16 declared, f32 bytes: the size gives it away
    with pytest.raises(ProtocolError, match=r"ShardLayerRequest\.x\.shape: expected a frame of 640 bytes"):
        decode([frames[0], msgpack.packb(body), frames[2]])


@pytest.mark.parametrize("experts, offsets, message", [
    ([3, 1], [0, 2, 5], "experts .* strictly ascending"),
    ([3, 3], [0, 2, 5], "experts .* strictly ascending"),
    ([-1, 3], [0, 2, 5], "experts .* non-negative"),
    ([], [0], "at least one"),
    ([1, 3], [0, 5], "row_offsets .* must have 3 entries"),
    ([1, 3], [1, 2, 5], "row_offsets .* from 0 to the 5 rows"),
    ([1, 3], [0, 2, 4], "row_offsets .* from 0 to the 5 rows"),
    ([1, 3], [0, 0, 5], "row_offsets .* grow strictly"),
])
def test_a_malformed_request_is_refused_on_receipt(experts, offsets, message):
    with pytest.raises(ProtocolError, match=message):
        decode(encode(ShardLayerRequest(1, 0, 0, experts, offsets, hidden())))


def test_a_negative_layer_and_a_result_for_another_request_are_refused():
    with pytest.raises(ProtocolError, match="moe_layer -1 is negative"):
        decode(encode(ShardLayerRequest(1, 0, -1, [2], [0, 5], hidden())))
    request = ShardLayerRequest(8, 0, 0, [2], [0, 5], hidden())
    with pytest.raises(ProtocolError, match="ShardLayerResult 9 from shard 2 does not answer request 8"):
        ShardLayerResult(9, 2, hidden(), 1.0).check_answers(request)
    with pytest.raises(ProtocolError, match=r"outputs float32 \[4, 64\], the request's x is float32 \[5, 64\]"):
        ShardLayerResult(8, 2, hidden(rows=4), 1.0).check_answers(request)
