"""Malformed ZeroMQ messages for the fuzz tests of every receive loop (tests/integration/test_malformed_messages.py).

`malformed_variants(message, seed)` turns one valid message into named multipart messages that no
receiver may accept: random bytes, a random header, an unknown kind, an unknown version, a truncated
or non-list msgpack body, a missing field, each field in turn of the wrong type, an array frame too
many or too few, and seeded byte flips in the body that still fail to decode. Each variant is checked
here to fail `decode`, so a test never sends by accident a message that a receiver would act on.
`hypothesis_frames()` is the same idea as a hypothesis strategy (random frames and mutated valid
messages), for the in-process receivers, which must survive even a mutation that still decodes.
`hypothesis_malformed_frames()` keeps only what fails `decode` (random frames; valid messages with a
damaged header, an unknown version, a truncated or bit-flipped body, replaced bytes, frames dropped or
added; messages of a kind the receiver does not take), for the receivers of a live graph, which would
act on a well-formed message.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

import msgpack

from mer.errors import ProtocolError
from mer.protocol import decode, encode

UNKNOWN_KIND = 250


def frames_of(message: Any) -> list[bytes]:
    return [frame.tobytes() if hasattr(frame, "tobytes") else bytes(frame) for frame in encode(message)]


def _wrong_value(value: Any) -> Any:
    """A value of another wire type than `value` (a string for anything but a string)."""
    return 12345 if isinstance(value, str) else "not the right type"


def _byte_flips(header: bytes, body: bytes, arrays: list[bytes], rng: random.Random, count: int):
    for index in range(count):
        mutated = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(mutated))
            mutated[position] ^= 1 << rng.randrange(8)
        yield f"flipped body bytes #{index}", [header, bytes(mutated), *arrays]


def malformed_variants(message: Any, seed: int = 0, flips: int = 4,
                       expected_kinds: Collection | None = None) -> list[tuple[str, list[bytes]]]:
    """Named malformed messages made from the valid `message`; each one fails `decode` (checked here,
    against `expected_kinds` when given: what the receiver accepts)."""
    rng = random.Random(seed)
    header, body, *arrays = frames_of(message)
    fields = msgpack.unpackb(body, raw=False)
    variants: list[tuple[str, list[bytes]]] = [
        ("one empty frame", [b""]),
        ("random bytes", [rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(2, 4))]),
        ("a 3-byte header", [rng.randbytes(3), body, *arrays]),
        ("an unknown message kind", [bytes([UNKNOWN_KIND, 1]), body, *arrays]),
        ("an unknown protocol version", [bytes([header[0], (header[1] + 7) % 256]), body, *arrays]),
        ("a truncated body", [header, body[: max(1, len(body) // 2)], *arrays]),
        ("a body that is not msgpack", [header, b"\xc1" + body, *arrays]),
        ("a body that is a map", [header, msgpack.packb({"fields": fields}), *arrays]),
        ("an extra array frame", [header, body, *arrays, b"\0" * 8]),
    ]
    if fields:
        variants.append(("a missing field", [header, msgpack.packb(fields[:-1]), *arrays]))
        if arrays:
            variants.append(("a missing array frame", [header, body, *arrays[:-1]]))
        for index, value in enumerate(fields):
            wrong = [*fields[:index], _wrong_value(value), *fields[index + 1:]]
            variants.append((f"field {index} of the wrong type", [header, msgpack.packb(wrong), *arrays]))
    variants.extend(_byte_flips(header, body, arrays, rng, flips * 4))
    kept, flipped = [], 0
    for name, frames in variants:
        if not _fails_to_decode(frames, expected_kinds):
            continue  # a byte flip that still decodes (a changed number): not a malformed message
        if name.startswith("flipped"):
            if flipped == flips:
                continue
            flipped += 1
        kept.append((name, frames))
    assert all(_fails_to_decode(frames, expected_kinds) for _, frames in kept)
    return kept


def _fails_to_decode(frames: Sequence[bytes], expected_kinds: Collection | None) -> bool:
    try:
        decode(frames, expected_kinds=expected_kinds)
    except ProtocolError:
        return True
    return False


def hypothesis_frames(valid_messages: Sequence[Any]):
    """A hypothesis strategy of multipart messages: random frames, or a valid message with some of its
    bytes replaced, frames dropped or appended (which may still decode)."""
    from hypothesis import strategies as st

    random_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=4)

    @st.composite
    def mutated(draw):
        frames = [bytearray(frame) for frame in frames_of(draw(st.sampled_from(list(valid_messages))))]
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(frames) - 1))
            if frames[index]:
                position = draw(st.integers(0, len(frames[index]) - 1))
                frames[index][position] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            frames = frames[: draw(st.integers(1, len(frames)))]
        return [bytes(frame) for frame in frames]

    return st.one_of(random_frames, mutated())


def hypothesis_malformed_frames(valid_messages: Sequence[Any], expected_kinds: Collection | None = None):
    """A hypothesis strategy of multipart messages that a receiver taking `expected_kinds` must refuse
    (each fails `decode`): random frames, or one of `valid_messages` (of the receiver's kinds or of
    others: a wrong kind) damaged: any header bytes (an unknown kind or version), a truncated or
    bit-flipped body, bytes replaced in any frame, frames dropped or appended. For live receivers,
    which would act on a mutation that still decodes; `hypothesis_frames` keeps those."""
    from hypothesis import strategies as st

    encodings = [frames_of(message) for message in valid_messages]

    @st.composite
    def damaged(draw):
        frames = [bytearray(frame) for frame in draw(st.sampled_from(encodings))]
        header, body = frames[0], frames[1]
        damage = draw(st.sampled_from(("header", "version", "truncated body", "flipped bits", "replaced bytes",
                                       "dropped frames", "extra frames")))
        if damage == "header":
            frames[0] = bytearray(draw(st.binary(max_size=4)))
        elif damage == "version":
            header[1] = draw(st.integers(0, 255))
        elif damage == "truncated body":
            frames[1] = body[: draw(st.integers(0, max(0, len(body) - 1)))]
        elif damage == "flipped bits":
            for _ in range(draw(st.integers(1, 4))):
                position = draw(st.integers(0, len(body) - 1))
                body[position] ^= 1 << draw(st.integers(0, 7))
        elif damage == "replaced bytes":
            for _ in range(draw(st.integers(1, 4))):
                index = draw(st.integers(0, len(frames) - 1))
                if frames[index]:
                    frames[index][draw(st.integers(0, len(frames[index]) - 1))] = draw(st.integers(0, 255))
        elif damage == "dropped frames":
            frames = frames[: draw(st.integers(0, len(frames) - 1))]
        else:
            frames += [bytearray(frame) for frame in draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))]
        return [bytes(frame) for frame in frames] or [b""]

    random_frames = st.lists(st.binary(max_size=64), min_size=1, max_size=4)
    return st.one_of(random_frames, damaged()).filter(lambda frames: _refused(frames, expected_kinds))


def _refused(frames: Sequence[bytes], expected_kinds: Collection | None) -> bool:
    try:
        decode(frames, expected_kinds=expected_kinds)
    except Exception:  # noqa: BLE001 - a receiver refuses whatever `decode` raises
        return True
    return False
