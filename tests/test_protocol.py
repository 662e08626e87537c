"""The wire format: round trips of every command, over real ZeroMQ sockets too, and rejections."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pydantic
import pytest
import zmq

from fer_swarm.errors import ProtocolError
from fer_swarm.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_TAG,
    Busy,
    Command,
    CorrelationId,
    Disconnect,
    Error,
    Expired,
    Heartbeat,
    Hello,
    Job,
    ModelInfo,
    Ready,
    Result,
    Welcome,
    decode,
    decode_routed,
    encode,
    encode_routed,
    error_reply,
)

CID = CorrelationId(stream="cam0", frame=12, face=3)
LABELS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
MODEL = ModelInfo(
    name="fer-vgg", version="1", input_shape=(1, 48, 48, 1), labels=LABELS, width_px=48, height_px=48
)
PIXELS = bytes(range(256)) * 9  # 48*48 = 2304 bytes, every byte value present


def _job(**kw: object) -> Job:
    fields: dict[str, object] = dict(id=CID, deadline_ms=250, width_px=48, height_px=48, payload=PIXELS)
    fields.update(kw)
    return Job(**fields)


SAMPLES = [
    Hello(client="unity-headset 0.3"),
    Hello(),
    Welcome(model=MODEL, workers=2, max_payload_bytes=1 << 20, heartbeat_interval_s=1.0),
    Welcome(model=None, workers=0, max_payload_bytes=4096, heartbeat_interval_s=0.5),
    Ready(worker="pi-kitchen", capacity=4, model=MODEL),
    _job(),
    _job(job=17, width_px=1, height_px=1, payload=b"\xff"),
    Result(
        id=CID,
        job=17,
        label="happy",
        probabilities={name: (0.94 if name == "happy" else 0.01) for name in LABELS},
        model=MODEL.ref,
        worker="pi-kitchen",
        inference_ms=3.25,
    ),
    Heartbeat(),
    Disconnect(reason="shutting down"),
    Disconnect(),
    Expired(id=CID, job=17, reason="deadline passed after 250 ms"),
    Busy(id=CID, reason="queue full (64 jobs)"),
    Error(id=None, reason="header not readable"),
]


def _good_job_frames() -> list[bytes]:
    return encode(_job(width_px=4, height_px=2, payload=bytes(8)))


def _decode_error(frames: list[bytes], **kw: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kw)  # type: ignore[arg-type]
    return info.value


# --- round trips without sockets ---------------------------------------------------------------


def test_samples_cover_every_command() -> None:
    assert {type(m).command for m in SAMPLES} == set(Command)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    frames = encode(msg)  # type: ignore[arg-type]
    back = decode(frames)
    assert type(back) is type(msg)
    assert back == msg


def test_frame_layout_and_header_json() -> None:
    tag, word, header, payload = encode(_job(job=5))
    assert tag == b"fer-swarm/1" == PROTOCOL_TAG
    assert word == b"JOB"
    assert payload == PIXELS
    parsed = json.loads(header)
    assert parsed == {
        "id": {"stream": "cam0", "frame": 12, "face": 3},
        "deadline_ms": 250,
        "width_px": 48,
        "height_px": 48,
        "encoding": "gray8",
        "job": 5,
    }
    assert b" " not in header  # compact separators
    assert encode(Heartbeat()) == [PROTOCOL_TAG, b"HEARTBEAT", b"{}"]


def test_decode_accepts_bytes_like_frames() -> None:
    frames = encode(_job())
    for convert in (bytearray, memoryview, zmq.Frame):
        assert decode([convert(f) for f in frames]) == _job()


def test_client_job_may_leave_out_job_number_and_encoding() -> None:
    header = b'{"id":{"stream":"s","frame":0,"face":0},"deadline_ms":1,"width_px":2,"height_px":1}'
    job = decode([PROTOCOL_TAG, b"JOB", header, b"ab"])
    assert isinstance(job, Job)
    assert (job.job, job.encoding, job.payload) == (None, "gray8", b"ab")


def test_messages_are_frozen_and_ids_hashable() -> None:
    with pytest.raises(pydantic.ValidationError):
        CID.frame = 13  # type: ignore[misc]
    twin = CorrelationId(stream="cam0", frame=12, face=3)
    assert {CID: "box"}[twin] == "box"
    assert CID.key() == ("cam0", 12, 3)
    assert MODEL.ref == "fer-vgg:1"


def test_job_refuses_payload_of_wrong_size_at_construction() -> None:
    with pytest.raises(pydantic.ValidationError, match="expected width_px\\*height_px"):
        _job(payload=PIXELS[:-1])


def test_result_label_must_be_a_class() -> None:
    with pytest.raises(pydantic.ValidationError, match="not a key of probabilities"):
        Result(id=CID, label="bored", probabilities={"happy": 0.5, "sad": 0.5}, model="m:1", worker="w",
               inference_ms=1.0)


def test_encode_refuses_oversized_header() -> None:
    probabilities = {f"{i:03d}".ljust(64, "x"): 0.0 for i in range(200)}
    probabilities["000".ljust(64, "x")] = 1.0
    big = Result(id=CID, label="000".ljust(64, "x"), probabilities=probabilities, model="m:1", worker="w",
                 inference_ms=0.0)
    with pytest.raises(ProtocolError, match=f"limit is {MAX_HEADER_BYTES}"):
        encode(big)


def test_error_reply() -> None:
    reply = error_reply(Expired, "x" * 1000, id=CID, job=4)
    assert isinstance(reply, Expired)
    assert (reply.id, reply.job, len(reply.reason)) == (CID, 4, 500)
    assert reply.reason.endswith("...")
    assert decode(encode(reply)) == reply
    with pytest.raises(TypeError):
        error_reply(Result, "no")  # type: ignore[arg-type]


# --- rejections --------------------------------------------------------------------------------

JOB_HEADER = _good_job_frames()[2]

MALFORMED = {
    "no frames": ([], "empty message"),
    "too few frames": ([PROTOCOL_TAG, b"HELLO"], "2 frame(s); expected at least 3"),
    "bad tag": ([b"zmtp/3", b"HELLO", b"{}"], "bad protocol tag"),
    "other version": ([b"fer-swarm/2", b"HELLO", b"{}"], "unsupported protocol version"),
    "REQ delimiter": ([b"", PROTOCOL_TAG, b"HELLO", b"{}"], "use DEALER"),
    "unknown command": ([PROTOCOL_TAG, b"HELO", b"{}"], "unknown command b'HELO'"),
    "lower-case command": ([PROTOCOL_TAG, b"hello", b"{}"], "unknown command b'hello'"),
    "header not UTF-8": ([PROTOCOL_TAG, b"HELLO", b'{"client":"\xff"}'], "HELLO header is not UTF-8"),
    "header not JSON": ([PROTOCOL_TAG, b"HELLO", b'{"client":'], "HELLO header is not valid JSON"),
    "header an array": ([PROTOCOL_TAG, b"HELLO", b"[]"], "not a JSON object (got array)"),
    "header a string": ([PROTOCOL_TAG, b"HEARTBEAT", b'"hi"'], "not a JSON object (got string)"),
    "header too big": (
        [PROTOCOL_TAG, b"HELLO", b'{"client":"' + b"x" * MAX_HEADER_BYTES + b'"}'],
        f"HELLO header is {MAX_HEADER_BYTES + 13} bytes; limit is {MAX_HEADER_BYTES}",
    ),
    "missing field": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"deadline_ms":250,', b""), bytes(8)],
        "deadline_ms: Field required",
    ),
    "out of range": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"deadline_ms":250', b'"deadline_ms":600001'), bytes(8)],
        "deadline_ms: Input should be less than or equal to 600000",
    ),
    "string for int": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"width_px":4', b'"width_px":"4"'), bytes(8)],
        "width_px: Input should be a valid integer",
    ),
    "nested field": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"frame":12', b'"frame":-1'), bytes(8)],
        "id.frame: Input should be greater than or equal to 0",
    ),
    "unknown extra field": (
        [PROTOCOL_TAG, b"HELLO", b'{"client":"a","colour":"red"}'],
        "colour: Extra inputs are not permitted",
    ),
    "payload in header": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER[:-1] + b',"payload":"AAAA"}', bytes(8)],
        "payload: Extra inputs are not permitted",
    ),
    "other encoding": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"gray8"', b'"rgb8"'), bytes(8)],
        "encoding: Input should be 'gray8'",
    ),
    "payload length mismatch": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(9)],
        "JOB payload is 9 bytes; expected width_px*height_px = 4*2 = 8 bytes",
    ),
    "JOB without payload": ([PROTOCOL_TAG, b"JOB", JOB_HEADER], "JOB takes exactly 1 payload frame, got 0"),
    "JOB with two payloads": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(4), bytes(4)],
        "JOB takes exactly 1 payload frame, got 2",
    ),
    "payload on HEARTBEAT": (
        [PROTOCOL_TAG, b"HEARTBEAT", b"{}", b"x"],
        "HEARTBEAT takes no payload frames, got 1",
    ),
    "probability out of 0..1": (
        [PROTOCOL_TAG, b"RESULT", encode(SAMPLES[7])[2].replace(b'"happy":0.94', b'"happy":1.5')],
        "probability of 'happy' is 1.5",
    ),
}


@pytest.mark.parametrize(("frames", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_is_rejected_with_reason(frames: list[bytes], reason: str) -> None:
    err = _decode_error(frames)
    assert reason in str(err)
    assert err.identity is None  # type: ignore[attr-defined]


def test_header_size_limit_is_inclusive() -> None:
    def padded(size: int) -> bytes:
        header = b'{"client":"a"' + b" " * (size - 14) + b"}"
        assert len(header) == size
        return header

    assert decode([PROTOCOL_TAG, b"HELLO", padded(MAX_HEADER_BYTES)]) == Hello(client="a")
    err = _decode_error([PROTOCOL_TAG, b"HELLO", padded(MAX_HEADER_BYTES + 1)])
    assert "limit is 8192" in str(err)


def test_payload_over_limit() -> None:
    frames = encode(_job())
    err = _decode_error(frames, max_payload_bytes=len(PIXELS) - 1)
    assert f"JOB payload is {len(PIXELS)} bytes; limit is {len(PIXELS) - 1}" in str(err)
    assert decode(frames, max_payload_bytes=len(PIXELS)) == _job()


def test_id_recovered_from_job_that_fails_on_another_field() -> None:
    header = JOB_HEADER.replace(b'"width_px":4', b'"width_px":0').replace(b'"job":null', b'"job":41')
    err = _decode_error([PROTOCOL_TAG, b"JOB", header, bytes(8)])
    assert "width_px" in str(err)
    assert (err.command, err.id, err.job) == (Command.JOB, CID, 41)  # type: ignore[attr-defined]


def test_id_recovered_on_payload_errors() -> None:
    err = _decode_error([PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(7)])
    assert err.id == CID  # type: ignore[attr-defined]
    err = _decode_error([PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(8)], max_payload_bytes=4)
    assert err.id == CID  # type: ignore[attr-defined]


def test_id_is_none_when_unreadable() -> None:
    bad_id = JOB_HEADER.replace(b'"stream":"cam0"', b'"stream":""')
    err = _decode_error([PROTOCOL_TAG, b"JOB", bad_id, bytes(8)])
    assert "id.stream" in str(err)
    assert err.id is None  # type: ignore[attr-defined]
    err = _decode_error([PROTOCOL_TAG, b"JOB", b"{not json", bytes(8)])
    assert (err.command, err.id) == (Command.JOB, None)  # type: ignore[attr-defined]
    err = _decode_error([b"fer-swarm/2", b"JOB", JOB_HEADER, bytes(8)])
    assert (err.command, err.id) == (None, None)  # type: ignore[attr-defined]


def test_decode_routed_keeps_identity_on_error() -> None:
    identity, msg = decode_routed([b"\x00k\x8b\x45\x67", *encode(Heartbeat())])
    assert (identity, msg) == (b"\x00k\x8b\x45\x67", Heartbeat())
    with pytest.raises(ProtocolError, match="unknown command") as info:
        decode_routed([b"edge-1", PROTOCOL_TAG, b"NOPE", b"{}"])
    assert info.value.identity == b"edge-1"  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="empty message") as info:
        decode_routed([b"edge-1"])
    assert info.value.identity == b"edge-1"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "frames", [[], encode(Heartbeat()), [b"", *encode(Heartbeat())]], ids=["no frames", "tag first", "empty identity"]
)
def test_decode_routed_without_identity(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError, match="routing identity") as info:
        decode_routed(frames)
    assert info.value.identity is None  # type: ignore[attr-defined]


# --- over real ZeroMQ sockets ------------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def pair(ctx: zmq.Context, request: pytest.FixtureRequest) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A DEALER connected to a ROUTER over inproc, both with a receive timeout so a test cannot hang."""
    address = f"inproc://protocol-{request.node.name}"
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.linger = 0
        sock.rcvtimeo = 2000
    dealer.identity = b"edge-1"
    try:
        router.bind(address)
        dealer.connect(address)
        yield dealer, router
    finally:
        dealer.close(linger=0)
        router.close(linger=0)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_over_dealer_router(pair: tuple[zmq.Socket, zmq.Socket], msg: object) -> None:
    dealer, router = pair
    dealer.send_multipart(encode(msg))  # type: ignore[arg-type]
    identity, got = decode_routed(router.recv_multipart(copy=False))
    assert identity == b"edge-1"
    assert got == msg
    router.send_multipart(encode_routed(identity, got))
    assert decode(dealer.recv_multipart()) == msg


def test_broker_can_answer_a_malformed_job_over_sockets(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    dealer, router = pair
    dealer.send_multipart([PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(5)])
    with pytest.raises(ProtocolError) as info:
        decode_routed(router.recv_multipart())
    err = info.value
    assert err.identity == b"edge-1"  # type: ignore[attr-defined]
    answer = error_reply(Error, str(err), id=err.id)  # type: ignore[attr-defined]
    router.send_multipart(encode_routed(err.identity, answer))  # type: ignore[attr-defined]
    reply = decode(dealer.recv_multipart())
    assert isinstance(reply, Error)
    assert reply.id == CID
    assert "payload is 5 bytes" in reply.reason
