"""Routing traces: round trips through real files, flushing per token, and errors with line numbers."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mer.errors import TraceError
from mer.routing.space import RoutingDecision, RoutingSpace
from mer.routing.trace import TraceHeader, TraceWriter, count_trace_tokens, read_trace

HEADER = TraceHeader(layers=2, experts_per_layer=4, top_k=2)
DECISIONS = [
    RoutingDecision(0, 0, (0, 3), (0.5, 0.5)),
    RoutingDecision(0, 1, (2, 1), (0.1, 0.9)),
    RoutingDecision(1, 0, (3, 2), (1 / 3, 2 / 3)),
    RoutingDecision(1, 1, (1, 0), (float(np.float32(0.7)), float(np.float32(0.3)))),
]


def write_trace(path, header=HEADER, decisions=DECISIONS):
    with TraceWriter(path, header) as writer:
        for decision in decisions:
            writer.write(decision)
    return path


def test_round_trip_keeps_every_field_exactly(tmp_path):
    header, decisions = read_trace(write_trace(tmp_path / "t.jsonl"))
    assert header == HEADER
    assert list(decisions) == DECISIONS
    assert count_trace_tokens(tmp_path / "t.jsonl") == (HEADER, 2)


def test_file_layout_is_the_documented_format(tmp_path):
    lines = write_trace(tmp_path / "t.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"mer_trace": 1, "layers": 2, "experts_per_layer": 4, "top_k": 2}
    assert json.loads(lines[2]) == {"token": 0, "layer": 1, "experts": [2, 1], "weights": [0.1, 0.9]}
    assert len(lines) == 5


def test_flat_pool_header_records_one_layer_of_all_experts():
    assert TraceHeader.for_space(RoutingSpace(32, 8, 2)) == TraceHeader(1, 256, 2)
    assert TraceHeader.for_space(RoutingSpace(32, 8, 2, layered=True)) == TraceHeader(32, 8, 2)


def test_writer_accepts_numpy_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, TraceHeader(1, 8, 2)) as writer:
        writer.write(RoutingDecision(np.int64(0), 0, tuple(np.array([7, 2])), tuple(np.array([0.25, 0.75]))))
    assert list(read_trace(path)[1]) == [RoutingDecision(0, 0, (7, 2), (0.25, 0.75))]


def test_writer_flushes_whole_tokens_only(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, HEADER)
    writer.write(DECISIONS[0])
    assert len(path.read_text().splitlines()) == 1  # header only: token 0 is not complete
    writer.write(DECISIONS[1])
    assert list(read_trace(path)[1]) == DECISIONS[:2]  # readable while the writer is open
    writer.write(DECISIONS[2])
    assert writer.num_tokens_written == 1
    writer.close()  # drops the unfinished token 1
    writer.close()
    assert writer.is_closed
    assert count_trace_tokens(path) == (HEADER, 1)
    with pytest.raises(TraceError, match="closed"):
        writer.write(DECISIONS[3])


def test_in_an_event_loop_each_token_is_written_by_an_aiofiles_thread_with_the_same_bytes(tmp_path):
    path = tmp_path / "t.jsonl"
    submitted = []

    class RecordingExecutor(ThreadPoolExecutor):
        def submit(self, function, *args, **kwargs):
            submitted.append(threading.get_ident())
            return super().submit(function, *args, **kwargs)

    async def record():
        asyncio.get_running_loop().set_default_executor(RecordingExecutor(1))
        async with TraceWriter(path, HEADER) as writer:
            for decision in DECISIONS:
                await writer.awrite(decision)
        return writer, threading.get_ident()

    writer, loop_thread = asyncio.run(record())
    assert writer.is_closed and writer.num_tokens_written == 2
    assert submitted == [loop_thread] * 2  # one write per token, handed from the loop to the pool
    assert path.read_bytes() == write_trace(tmp_path / "sync.jsonl").read_bytes()  # the format is unchanged
    assert list(read_trace(path)[1]) == DECISIONS


@pytest.mark.parametrize("decision, message", [
    (RoutingDecision(0, 0, (0, 4), (0.5, 0.5)), "expert id 4 is out of range 0..3"),
    (RoutingDecision(0, 0, (0, 1, 2), (0.5, 0.5, 0.0)), "3 experts, the header's top_k is 2"),
    (RoutingDecision(0, 0, (1, 1), (0.5, 0.5)), r"experts \[1, 1\] are not distinct"),
    (RoutingDecision(0, 0, (0, 1), (0.5,)), "1 weights"),
    (RoutingDecision(0, 0, (0, 1), (0.5, float("nan"))), "weight nan is not a finite number"),
    (RoutingDecision(0, 2, (0, 1), (0.5, 0.5)), "layer 2 is out of range 0..1"),
    (RoutingDecision(0, 1, (0, 1), (0.5, 0.5)), "layer 1 of token 0, expected layer 0"),
])
def test_writer_rejects_bad_decisions(tmp_path, decision, message):
    with TraceWriter(tmp_path / "t.jsonl", HEADER) as writer:
        with pytest.raises(TraceError, match=message):
            writer.write(decision)


def lines_of(tmp_path, *lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_HEADER = '{"mer_trace": 1, "layers": 2, "experts_per_layer": 4, "top_k": 2}'


def line(token, layer, experts, weights=(0.5, 0.5)):
    return json.dumps({"token": token, "layer": layer, "experts": list(experts), "weights": list(weights)})


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"token": 1, "layer": 0, "experts": [1, 2]}', "missing field 'weights'"),
    ('{"token": 1, "layer": 0, "experts": 3, "weights": [0.5, 0.5]}', "field 'experts' must be a list"),
    (line(1, 0, (1, 9)), "expert id 9 is out of range 0..3"),
    (line(1, 0, (1, 1.5)), "expert id 1.5 is not an integer"),
    (line(1, 0, (1,), (1.0,)), "1 experts, the header's top_k is 2"),
    (line(1, 0, (1, 2), (0.5, "x")), "weight 'x' is not a finite number"),
    (line(1, 0, (1, 2), (0.5, float("inf"))), "weight inf is not a finite number"),
    (line(1, 1, (1, 2)), "layer 1 of token 1, expected layer 0"),
    (line(2, 0, (1, 2)), "token 2, expected token 1"),
    (line(-1, 0, (1, 2)), "token must be a non-negative integer"),
])
def test_malformed_decision_lines_name_file_and_line(tmp_path, bad_line, message):
    path = lines_of(tmp_path, GOOD_HEADER, line(0, 0, (0, 1)), line(0, 1, (2, 3)), "", bad_line)
    header, decisions = read_trace(path)
    assert header == HEADER
    assert next(decisions).token == 0 and next(decisions).layer == 1
    with pytest.raises(TraceError, match=rf"bad\.jsonl:5: .*{message}"):
        next(decisions)


@pytest.mark.parametrize("header_line, message", [
    ('{"mer_trace": 2, "layers": 2, "experts_per_layer": 4, "top_k": 2}',
     "trace version 2, this mer reads version 1"),
    ('{"token": 0, "layer": 0}', "not a mer routing trace"),
    ("garbage", "header is not JSON"),
    ('{"mer_trace": 1, "layers": 0, "experts_per_layer": 4, "top_k": 2}', "'layers' must be a positive integer"),
    ('{"mer_trace": 1, "layers": 2, "experts_per_layer": 4, "top_k": 5}', "top_k 5 exceeds experts_per_layer 4"),
    ('{"mer_trace": 1, "layers": 2, "top_k": 1}', "'experts_per_layer' must be a positive integer, got None"),
])
def test_bad_headers_fail_on_open(tmp_path, header_line, message):
    with pytest.raises(TraceError, match=rf"bad\.jsonl:1: .*{message}"):
        read_trace(lines_of(tmp_path, header_line, line(0, 0, (0, 1))))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(TraceError, match=r"empty\.jsonl:1: empty file"):
        read_trace(lines_of(tmp_path, name="empty.jsonl"))
    with pytest.raises(TraceError, match=r"missing\.jsonl: cannot read the trace"):
        read_trace(tmp_path / "missing.jsonl")


def test_a_trace_ending_inside_a_token_is_malformed(tmp_path):
    path = lines_of(tmp_path, GOOD_HEADER, line(0, 0, (0, 1)), line(0, 1, (2, 3)), line(1, 0, (0, 1)))
    with pytest.raises(TraceError, match=r"bad\.jsonl:4: the trace ends inside token 1 \(after layer 0 of 2\)"):
        count_trace_tokens(path)


def test_tokens_may_start_anywhere_and_blank_lines_are_skipped(tmp_path):
    path = lines_of(tmp_path, GOOD_HEADER, line(7, 0, (0, 1)), "   ", line(7, 1, (2, 3)), line(8, 0, (0, 1)),
                    line(8, 1, (3, 1)))
    assert [(d.token, d.layer) for d in read_trace(path)[1]] == [(7, 0), (7, 1), (8, 0), (8, 1)]


def test_writer_cannot_create_a_file_in_a_missing_directory(tmp_path):
    with pytest.raises(TraceError, match="cannot create the trace"):
        TraceWriter(tmp_path / "no" / "such" / "t.jsonl", HEADER)


def test_binary_files_are_reported(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TraceError, match=r"binary\.jsonl:1: not UTF-8 text"):
        read_trace(path)
    path.write_bytes((GOOD_HEADER + "\n" + line(0, 0, (0, 1)) + "\n").encode() + b"\xff\xfe\n")
    with pytest.raises(TraceError, match=r"binary\.jsonl:3: not UTF-8 text"):
        list(read_trace(path)[1])


def with_hidden(decisions, size, seed=0):
    rng = np.random.default_rng(seed)
    return [RoutingDecision(d.token, d.layer, d.experts, d.weights, rng.standard_normal(size).astype(np.float32))
            for d in decisions]


def test_hidden_states_round_trip_bit_exactly_as_base64_float32(tmp_path):
    decisions = with_hidden(DECISIONS, 128)
    path = write_trace(tmp_path / "t.jsonl", decisions=decisions)
    line = json.loads(path.read_text().splitlines()[1])
    assert isinstance(line["hidden"], str) and len(line["hidden"]) == 684  # 512 bytes in base64
    _, read_back = read_trace(path)
    for original, back in zip(decisions, read_back):
        assert back == original and back.hidden.dtype == np.float32
        assert back.hidden.tobytes() == original.hidden.tobytes()
    _, plain = read_trace(write_trace(tmp_path / "plain.jsonl"))
    assert all(decision.hidden is None for decision in plain)


def test_hidden_states_are_all_or_none_with_one_length(tmp_path):
    mixed = with_hidden(DECISIONS[:2], 8) + DECISIONS[2:]
    with pytest.raises(TraceError, match="no hidden state, but the decisions before had 8 values"):
        write_trace(tmp_path / "mixed.jsonl", decisions=mixed)
    lengths = with_hidden(DECISIONS[:2], 8) + with_hidden(DECISIONS[2:], 16)
    with pytest.raises(TraceError, match="a hidden state of 16 values, but the decisions before had 8 values"):
        write_trace(tmp_path / "lengths.jsonl", decisions=lengths)


@pytest.mark.parametrize("hidden, message", [
    (12, "field 'hidden' must be a base64 string of float32 values, got int"),
    ("not base64!", "field 'hidden' is not valid base64"),
    ("AAAAAAA=", "field 'hidden' holds 5 bytes, not a whole number of float32 values"),
    ("AADAfw==", "field 'hidden' holds a value that is not finite"),  # a float32 NaN
])
def test_bad_hidden_states_name_the_line(tmp_path, hidden, message):
    path = tmp_path / "t.jsonl"
    line = {"token": 0, "layer": 0, "experts": [0, 1], "weights": [0.5, 0.5], "hidden": hidden}
    path.write_text(json.dumps(HEADER.to_json_dict()) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(TraceError, match=rf"t.jsonl:2: {message}"):
        list(read_trace(path)[1])
