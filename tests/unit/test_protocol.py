"""The message protocol: exact round trips, zero-copy arrays, and a clear ProtocolError for bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from mer.errors import ProtocolError, RemoteError
from mer.metrics.events import LayerHintCounts, PredictorCounters
from mer.metrics.stats import LatencyHistogram
from mer.protocol import (
    MESSAGE_TYPES,
    CancelSequence,
    SequenceDone,
    SequenceToken,
    ServeStep,
    StartServing,
    StartPerplexity,
    PerplexityChunk,
    ShardLayerRequest,
    ShardLayerResult,
    StartShardGroup,
    StopShardGroup,
    SubmitSequence,
    Acquire,
    ChildFailed,
    ComputeItem,
    ErrorReply,
    ExpertBatchJob,
    ExpertBatchResult,
    Heartbeat,
    Hello,
    HiddenObserved,
    IoStats,
    IoWorkerRestarted,
    JobProgress,
    IoProgress,
    PredictorProgress,
    ChildStuck,
    LeasesDropped,
    JobDone,
    MessageKind,
    PrefetchHint,
    PinSet,
    PrefetchHints,
    PredictorReport,
    PredictorStats,
    PrefetchCounts,
    ReadCounts,
    SplitReads,
    Ready,
    Release,
    RoutingObserved,
    Shutdown,
    StartBenchmark,
    StartGeneration,
    SliceRange,
    SlotGrant,
    SlotRef,
    SlotsReady,
    StatsRequest,
    TokenGenerated,
    decode,
    encode,
    error_fields,
    error_reply,
    raise_remote,
)


def activations(batch: int = 1, d_model: int = 4096, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, d_model), dtype=np.float32)


def io_stats_sample() -> IoStats:
    """An `IoStats` with every counter set (a histogram of three latencies, two predictors)."""
    markov = PredictorReport("markov", PredictorCounters(9, 5, 4, 3, 1, 4, 0, 8, 5, 11, 16), [])
    gate = PredictorReport("gate", PredictorCounters(hints=2, predictions=1), [LayerHintCounts(3, 1, 1, 1, 2, 2, 2)])
    return IoStats(99, "uring", True, ReadCounts(12, 12 << 20), ReadCounts(5, 5 << 20), ReadCounts(7, 7 << 20),
                   LatencyHistogram.of([0.5, 812.5, 1 << 40]), PrefetchCounts(5, 4, 3, 1, 4, 0), [gate, markov],
                   [3, -1, 17, 4], 1, 2)


def test_io_stats_records_are_checked_by_path():
    body = msgpack.unpackb(encode(io_stats_sample())[1])
    assert decode(frames_with_body(io_stats_sample(), body)) == io_stats_sample()
    with pytest.raises(ProtocolError, match=r"IoStats\.o_direct: expected a boolean, got int 1"):
        decode(frames_with_body(io_stats_sample(), [*body[:2], 1, *body[3:]]))
    body[4] = [3, 100, 0]
    with pytest.raises(ProtocolError, match=r"IoStats\.prefetch_reads: expected a list of 2 fields \(reads, nbytes\)"):
        decode(frames_with_body(io_stats_sample(), body))
    body = msgpack.unpackb(encode(io_stats_sample())[1])
    body[8][0][1][0] = "many"
    with pytest.raises(ProtocolError, match=r"IoStats\.predictors\[0\]\.counters\.hints: expected an integer"):
        decode(frames_with_body(io_stats_sample(), body))


def sample_messages() -> list:
    """One message of every kind, with non-trivial values in every field."""
    return [
        Hello("mer-io-0a1b2c3d", 4242),
        Ready("mer-io-0a1b2c3d", 4242, {"io_backend": "uring", "slots": 64, "direct": True, "share": 0.5, "x": None}),
        ChildFailed("mer-compute-1-0a1b2c3d", "mer.errors.StoreError", "bad store", "Traceback ...\n"),
        Shutdown("SIGINT"),
        JobDone(
            {"tokens": 300, "hit_rate_pct": 61.5, "io_latency_us": {"p50": 812.0, "p99": 2400.5}, "tags": [1, "a"]},
        ),
        Acquire(17, 5, [3, 200, 7]),
        SlotsReady(17, [SlotGrant(3, 0, 9, True, 0.0, False), SlotGrant(200, 5, 2, False, 812.5, True)], True),
        Release([SlotRef(3, 0, 9), SlotRef(200, 5, 2)]),
        PrefetchHints(6, [PrefetchHint(11, 0.75), PrefetchHint(12, 0.125)], "markov2"),
        StatsRequest(99),
        io_stats_sample(),
        RoutingObserved(5, 3, [1, 6], [0.625, 0.375]),
        ErrorReply(17, "ValueError", "slot 5 is stale", "Traceback (most recent call last): ...\n"),
        StartBenchmark(),
        StartGeneration("/m.gguf", [1, 5, 9], 16, 0.7, 40, 0.9, 3, True, [2], "/tmp/l.npy"),
        TokenGenerated(3, 271),
        Heartbeat("mer-compute-1-0a1b2c3d"),
        ExpertBatchJob(
            32,
            [ComputeItem(3, 0, 9, 0), ComputeItem(5, 2, 4, 0)],
            [SliceRange(0, 896), SliceRange(1792, 2688)],
            activations(batch=5),
            [0, 2, 5],
        ),
        ExpertBatchResult(32, 0, np.arange(2 * 5 * 64, dtype=np.float32).reshape(2, 5, 64), 99.5),
        PredictorStats("gate", 7, 3, 9, 14, [LayerHintCounts(2, 1, 7, 3, 9, 14, 11)]),
        SplitReads(12),
        LeasesDropped(2),
        IoWorkerRestarted("mer-io-0a1b2c3d", 4343),
        JobProgress(32, 1, 7),
        IoProgress(17, 4242, 1234),
        PredictorProgress(4343, 1234),
        ChildStuck("mer-compute-1-0a1b2c3d", 4444, "compute job 32", 10.25),
        PinSet("locality", [4, 9]),
        HiddenObserved(7, 2, activations(d_model=64)[0]),
        StartServing("/m.gguf", 8, 2048, [2]),
        SubmitSequence(41, [1, 5, 9], 32, 0.8, 40, 0.95, 7, True, 3),
        CancelSequence(41, "client disconnected"),
        SequenceToken(41, 2, 117, -0.25, [117, 3], [-0.25, -1.5]),
        SequenceDone(41, "max_tokens", 3, 32, ""),
        ServeStep(12, 4, 7, 3, 1250.5, 4, 2, 300, 40, 8, 900.5, 1200.25, 8, 819200, 3, 2, 1, [500.5, 612.0],
                  [8, 3], 11, 0, 2),
        StartPerplexity("/m.gguf", [1, 5, 9, 12, 7, 3, 8, 2], 4, 2, 1),
        PerplexityChunk(1, 2, 1, 1.75, 3.0625, 5.5, 0.25),
        ShardLayerRequest(9, 12, 3, [1, 6], [0, 2, 5], activations(batch=5, d_model=64)),
        ShardLayerResult(9, 2, activations(batch=5, d_model=64, seed=1).astype(np.float16), 812.5),
        StartShardGroup("tcp://10.0.0.2:5555", "/keys", 1, [0, 3, 9]),
        StopShardGroup(),
    ]


def test_samples_cover_every_message_kind():
    assert sorted(type(message).KIND for message in sample_messages()) == sorted(MESSAGE_TYPES)
    assert len(MESSAGE_TYPES) == len(MessageKind) == 41


@pytest.mark.parametrize("message", sample_messages(), ids=lambda message: type(message).__name__)
def test_round_trip_is_exact(message):
    frames = encode(message)
    assert frames[0] == bytes([type(message).KIND, type(message).VERSION])
    received = [bytes(frame) for frame in frames]  # what a socket hands over, copied once
    decoded = decode(received)
    assert type(decoded) is type(message)
    assert decoded == message
    for name in type(message).__dataclass_fields__:
        mine, theirs = getattr(message, name), getattr(decoded, name)
        assert type(mine) is type(theirs), name
        if isinstance(mine, list) and mine:
            assert [type(item) for item in mine] == [type(item) for item in theirs], name


def test_records_decode_as_their_named_tuples():
    decoded = decode(encode(sample_messages()[6]))
    grant = decoded.refs[1]
    assert isinstance(grant, SlotGrant)
    assert (grant.expert_id, grant.slot, grant.generation, grant.hit, grant.read_us, grant.joined_prefetch) == (
        200, 5, 2, False, 812.5, True,
    )
    assert grant.ref == SlotRef(200, 5, 2)


def test_int_given_for_a_float_field_decodes_as_float():
    decoded = decode(encode(SlotsReady(1, [SlotGrant(1, 2, 3, True, 0, False)], False)))
    assert type(decoded.refs[0].read_us) is float


def sample_of(kind: type):
    (message,) = [message for message in sample_messages() if type(message) is kind]
    return message


def test_arrays_are_separate_frames_and_decode_as_views_onto_them():
    job = sample_of(ExpertBatchJob)
    frames = encode(job)
    assert len(frames) == 3
    assert np.shares_memory(frames[2], job.x)  # encoding does not copy a contiguous array
    received = [bytes(frame) for frame in frames]
    decoded = decode(received)
    frame_address = np.frombuffer(received[2], dtype=np.uint8).ctypes.data
    assert decoded.x.ctypes.data == frame_address  # a view onto the received frame, not a copy
    assert not decoded.x.flags.writeable
    np.testing.assert_array_equal(decoded.x, job.x)


def test_partials_keep_their_three_dimensional_shape():
    result = ExpertBatchResult(2, 0, np.full((16, 2, 4096), 0.5, dtype=np.float32), 10.0)
    decoded = decode([bytes(frame) for frame in encode(result)])
    assert decoded.partials.shape == (16, 2, 4096)
    assert decoded.partials.dtype == np.float32
    assert float(decoded.partials.sum()) == 16 * 2 * 4096 * 0.5


def test_non_contiguous_array_is_sent_by_value():
    wide = activations(batch=2, d_model=256)
    job = ExpertBatchJob(1, [ComputeItem(0, 0, 1, 0)], [], wide[:, ::2], [0, 2])
    decoded = decode(encode(job))
    np.testing.assert_array_equal(decoded.x, wide[:, ::2])


def test_empty_batch_round_trips():
    job = ExpertBatchJob(1, [], [SliceRange(0, 32)], np.zeros((0, 64), dtype=np.float32), [0])
    assert decode(encode(job)).x.shape == (0, 64)


# --- rejection ---------------------------------------------------------------------------------------


def frames_with_body(message, body: list) -> list:
    frames = encode(message)
    return [frames[0], msgpack.packb(body), *frames[2:]]


def test_unknown_kind_is_rejected():
    with pytest.raises(ProtocolError, match="unknown message kind 99"):
        decode([bytes([99, 1]), msgpack.packb([])])


def test_unexpected_kind_is_rejected_by_name():
    frames = encode(Hello("mer-io-0a1b2c3d", 1))
    with pytest.raises(ProtocolError, match=r"unexpected message Hello.*\['Acquire', 'Release'\]"):
        decode(frames, expected_kinds={Acquire, MessageKind.RELEASE})
    assert decode(frames, expected_kinds={MessageKind.HELLO}) == Hello("mer-io-0a1b2c3d", 1)
    assert decode(frames, expected_kinds=(Hello,)) == Hello("mer-io-0a1b2c3d", 1)


def test_wrong_version_is_rejected():
    frames = encode(Shutdown("done"))
    with pytest.raises(ProtocolError, match="Shutdown: protocol version 7, this side speaks 1"):
        decode([bytes([MessageKind.SHUTDOWN, 7]), frames[1]])


@pytest.mark.parametrize("header", [b"", b"\x04", b"\x04\x01\x00"])
def test_malformed_header_is_rejected(header):
    with pytest.raises(ProtocolError, match="frame 0 must be 2 bytes"):
        decode([header, encode(Shutdown("x"))[1]])


def test_too_few_frames_is_rejected():
    with pytest.raises(ProtocolError, match="at least 2 frames"):
        decode([bytes([MessageKind.SHUTDOWN, 1])])


@pytest.mark.parametrize("body", [["a", 1, "extra"], ["a"], []])
def test_wrong_field_count_is_rejected(body):
    with pytest.raises(ProtocolError, match=rf"Hello: body has {len(body)} fields, expected 2"):
        decode(frames_with_body(Hello("a", 1), body))


@pytest.mark.parametrize(
    ("body", "message_pattern"),
    [
        (["name", "12"], r"Hello\.pid: expected an integer, got str '12'"),
        (["name", 1.0], r"Hello\.pid: expected an integer, got float 1\.0"),
        (["name", True], r"Hello\.pid: expected an integer, got bool True"),
        ([7, 1], r"Hello\.name: expected a string, got int 7"),
    ],
)
def test_wrong_scalar_types_are_rejected(body, message_pattern):
    with pytest.raises(ProtocolError, match=message_pattern):
        decode(frames_with_body(Hello("a", 1), body))


@pytest.mark.parametrize(
    ("body", "message_pattern"),
    [
        ([1, 2, [3], 1], r"Acquire: body has 4 fields, expected 3"),
        ([1, 2, 3], r"Acquire\.expert_ids: expected a list, got int 3"),
        ([1, 2, [3, "4"]], r"Acquire\.expert_ids\[1\]: expected an integer, got str '4'"),
    ],
)
def test_wrong_list_types_are_rejected(body, message_pattern):
    with pytest.raises(ProtocolError, match=message_pattern):
        decode(frames_with_body(Acquire(1, 2, [3]), body))


def test_nested_record_errors_name_the_path():
    good = [1, [[3, 0, 9, True, 0.0, False], [4, 1, 2, False, 1.5, False]], True]
    short = [1, [good[1][0], [4, 1, 2]], True]
    with pytest.raises(ProtocolError, match=r"SlotsReady\.refs\[1\]: expected a list of 6 fields \(expert_id, slot"):
        decode(frames_with_body(SlotsReady(1, [], True), short))
    typed = [1, [good[1][0], [4, 1, 2, "no", 1.5, False]], True]
    with pytest.raises(ProtocolError, match=r"SlotsReady\.refs\[1\]\.hit: expected a boolean, got str 'no'"):
        decode(frames_with_body(SlotsReady(1, [], True), typed))
    assert decode(frames_with_body(SlotsReady(1, [], True), good)).refs[1] == SlotGrant(4, 1, 2, False, 1.5, False)


def test_maps_are_checked():
    with pytest.raises(ProtocolError, match=r"Ready\.info\['depth'\]: expected an int, float, str, bool or None"):
        decode(frames_with_body(Ready("a", 1, {}), ["a", 1, {"depth": [1, 2]}]))
    with pytest.raises(ProtocolError, match=r"JobDone\.summary\['x'\]\[1\]: expected a map with string keys"):
        decode(frames_with_body(JobDone({}), [{"x": [1, b"raw"]}]))
    with pytest.raises(ProtocolError, match=r"JobDone\.summary: expected a map with string keys, got list"):
        decode(frames_with_body(JobDone({}), [[1, 2]]))
    with pytest.raises(ProtocolError, match="not valid msgpack"):  # msgpack refuses int keys itself
        decode(frames_with_body(JobDone({}), [{1: 2}]))


def batch_job_frames(reference: dict, array_frames: list) -> list:
    """An `ExpertBatchJob` of one item on one row, with the given array reference and frames."""
    body = [31, [[3, 0, 9, 0]], [[0, 896], [1792, 2688]], reference, [0, 1]]
    return [bytes([MessageKind.EXPERT_BATCH_JOB, 1]), msgpack.packb(body), *array_frames]


def reference(index: int = 0, dtype: str = "<f4", shape: list | None = None) -> dict:
    return {"__array__": index, "dtype": dtype, "shape": [1, 4096] if shape is None else shape}


ONE_ROW = bytes(4 * 4096)


def test_the_good_array_reference_is_accepted():
    job = decode(batch_job_frames(reference(), [ONE_ROW]))
    assert job.x.shape == (1, 4096) and job.row_offsets == [0, 1]


@pytest.mark.parametrize(
    ("reference", "array_frames", "message_pattern"),
    [
        (reference(dtype="<f8"), [bytes(8 * 4096)], r"ExpertBatchJob\.x\.dtype: expected dtype '<f4'"),
        (reference(shape=[4096]), [ONE_ROW], r"ExpertBatchJob\.x\.shape: expected a shape \[batch, d_model\]"),
        (reference(shape=[1, -2]), [bytes(8)], r"ExpertBatchJob\.x\.shape: expected a shape"),
        (reference(shape=[2, 4096]), [ONE_ROW], r"expected a frame of 32768 bytes for shape \[2, 4096\], got 16384"),
        (reference(index=1), [ONE_ROW], r"ExpertBatchJob\.x\.__array__: expected an array frame index in 0\.\.0"),
        (reference(), [], r"expected an array frame index in 0\.\.-1"),
        ({"__array__": 0, "dtype": "<f4"}, [ONE_ROW], r"ExpertBatchJob\.x: expected an array reference"),
        ([1, 2], [ONE_ROW], r"ExpertBatchJob\.x: expected an array reference"),
        (reference(), [ONE_ROW, b"x"], r"array frames \[1\] are not referenced"),
    ],
)
def test_bad_array_references_are_rejected(reference, array_frames, message_pattern):
    with pytest.raises(ProtocolError, match=message_pattern):
        decode(batch_job_frames(reference, array_frames))


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\x92\x01", b"\x92\x01\x02\x03", b"\xa3\xff\xfe\xfd", b"\xd4\x05\x01"],
    ids=["never-used-byte", "truncated", "extra-data", "bad-utf8", "ext-type"],
)
def test_msgpack_garbage_is_rejected(body):
    with pytest.raises(ProtocolError, match="Hello: body"):
        decode([bytes([MessageKind.HELLO, 1]), body])


def test_body_that_is_not_a_list_is_rejected():
    with pytest.raises(ProtocolError, match="Hello: body must be a list of fields, got dict"):
        decode([bytes([MessageKind.HELLO, 1]), msgpack.packb({"name": "a"})])


def test_cross_field_checks():
    with pytest.raises(ProtocolError, match="RoutingObserved: 2 expert_ids but 1 weights"):
        decode(encode(RoutingObserved(1, 0, [1, 2], [1.0])))
    with pytest.raises(ProtocolError, match=r"ExpertBatchJob\.slices\[0\]: \[64, 64\) is not a non-empty range"):
        decode(encode(ExpertBatchJob(1, [], [SliceRange(64, 64)], activations(batch=0, d_model=8), [0])))


def test_random_corruption_gives_protocol_error_or_a_valid_message():
    seed = 20240531
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for message in sample_messages():
        frames = [bytes(frame) for frame in encode(message)]
        for _ in range(150):
            corrupted = bytearray(frames[1])
            for position in rng.integers(0, len(corrupted), size=rng.integers(1, 4)):
                corrupted[position] = int(rng.integers(0, 256))
            try:
                decode([frames[0], bytes(corrupted), *frames[2:]])
            except ProtocolError:
                pass


# --- encoding errors ---------------------------------------------------------------------------------


def test_encode_rejects_wrong_arrays_naming_the_field():
    with pytest.raises(ProtocolError, match=r"ExpertBatchJob\.x: expected a float32 array \[batch, d_model\], got float64"):
        encode(ExpertBatchJob(1, [], [], np.zeros((1, 8)), [0, 1]))
    with pytest.raises(ProtocolError, match=r"ExpertBatchResult\.partials: expected a float32 array .* shape \(2, 8\)"):
        encode(ExpertBatchResult(1, 0, np.zeros((2, 8), dtype=np.float32), 1.0))
    with pytest.raises(ProtocolError, match=r"ExpertBatchJob\.x: expected a float32 array .* got list"):
        encode(ExpertBatchJob(1, [], [], [[1.0]], [0, 1]))


def test_encode_rejects_unserialisable_values_naming_the_field():
    with pytest.raises(ProtocolError, match=r"Acquire\.expert_ids: cannot encode list \[np\.int64\(3\)\]"):
        encode(Acquire(1, 2, [np.int64(3)]))
    with pytest.raises(ProtocolError, match="str is not a protocol message"):
        encode("hello")


# --- errors across processes -------------------------------------------------------------------------


def failing_call():
    raise KeyError("expert 12")


def test_error_reply_carries_type_message_and_traceback_and_raises_remote_error():
    try:
        failing_call()
    except KeyError as error:
        reply = error_reply(8, error)
    received = decode(encode(reply), expected_kinds={ErrorReply})
    assert (received.request_id, received.error_type, received.message) == (8, "KeyError", "'expert 12'")
    assert "failing_call" in received.traceback and received.traceback.startswith("Traceback")
    with pytest.raises(RemoteError, match=r"mer-io-0a1b2c3d: KeyError: 'expert 12'") as raised:
        raise_remote(received, origin="mer-io-0a1b2c3d")
    assert raised.value.error_type == "KeyError"
    assert raised.value.remote_traceback == received.traceback


def test_child_failed_is_built_from_error_fields_with_a_qualified_type():
    error = ProtocolError("bad frame")
    failed = ChildFailed("mer-router-0a1b2c3d", *error_fields(error))
    assert failed.error_type == "mer.errors.ProtocolError"
    with pytest.raises(RemoteError, match="mer.errors.ProtocolError: bad frame"):
        raise_remote(decode(encode(failed)))


# --- over a real ZeroMQ ipc socket ------------------------------------------------------------------


@pytest.fixture
def ipc_pair(tmp_path):
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    worker = context.socket(zmq.DEALER)
    for socket in (router, worker):
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, 5000)
    worker.setsockopt(zmq.IDENTITY, b"compute-0")
    address = f"ipc://{tmp_path}/compute.sock"
    router.bind(address)
    worker.connect(address)
    yield router, worker
    router.close()
    worker.close()
    context.term()


def test_expert_batch_job_and_result_over_zeromq_ipc(ipc_pair):
    router, worker = ipc_pair
    worker.send_multipart(encode(Hello("compute-0", 1)))  # a ROUTER can only address a peer it has heard
    identity, *hello = router.recv_multipart()
    assert decode(hello, expected_kinds={Hello}) == Hello("compute-0", 1)
    job = ExpertBatchJob(5, [ComputeItem(1, 2, 3, 0)], [SliceRange(0, 896)], activations(batch=2, seed=3), [0, 2])
    router.send_multipart([identity, *encode(job)], copy=False)
    frames = worker.recv_multipart(copy=False)
    received = decode(frames, expected_kinds={ExpertBatchJob})
    assert received == job
    frame_view = np.frombuffer(frames[2].buffer, dtype=np.uint8)
    assert received.x.ctypes.data == frame_view.ctypes.data  # zero-copy view onto the zmq frame

    partials = np.stack([received.x * 2.0]).reshape(1, 2, 4096).astype(np.float32)
    worker.send_multipart(encode(ExpertBatchResult(5, 0, partials, 99.5)), copy=False)
    identity, *reply = router.recv_multipart(copy=False)
    result = decode(reply, expected_kinds={ExpertBatchResult, ErrorReply})
    assert identity.bytes == b"compute-0"
    assert (result.job_id, result.worker, result.compute_us) == (5, 0, 99.5)
    np.testing.assert_array_equal(result.partials[0], job.x * 2.0)


def test_a_bad_message_over_zeromq_does_not_stop_the_receiver(ipc_pair):
    router, worker = ipc_pair
    worker.send_multipart([bytes([MessageKind.EXPERT_BATCH_RESULT, 1]), b"\xc1"])
    worker.send_multipart(encode(Hello("compute-0", 1)))
    _, *bad = router.recv_multipart(copy=False)
    with pytest.raises(ProtocolError):
        decode(bad)
    _, *good = router.recv_multipart(copy=False)
    assert decode(good) == Hello("compute-0", 1)


@pytest.mark.parametrize("offsets", [[0, 2], [1, 2, 5], [0, 2, 4], [0, 5, 5], [0, 0, 5], [0, 2, 3, 5]])
def test_an_expert_batch_job_with_bad_row_offsets_is_refused(offsets):
    job = ExpertBatchJob(1, [ComputeItem(3, 0, 9, 0), ComputeItem(5, 2, 4, 0)], [SliceRange(0, 32)],
                         activations(batch=5, d_model=64), offsets)
    with pytest.raises(ProtocolError, match="row_offsets"):
        decode(encode(job))
