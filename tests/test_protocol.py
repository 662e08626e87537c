"""The wire format: round trips of every command, over real ZeroMQ sockets too, and rejections."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pydantic
import pytest
import zmq

from fer_swarm.errors import ProtocolError
from fer_swarm.protocol import (
    MAX_CROPS,
    MAX_HEADER_BYTES,
    MAX_INT,
    PROTOCOL_TAG,
    Busy,
    Report,
    Status,
    Command,
    CorrelationId,
    Disconnect,
    Error,
    Expired,
    FaceResult,
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
CID2 = CorrelationId(stream="cam0", frame=12, face=4)
CID3 = CorrelationId(stream="cam0", frame=12, face=5)
LABELS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
MODEL = ModelInfo(
    name="fer-vgg", version="1", input_shape=(1, 48, 48, 1), labels=LABELS, width_px=48, height_px=48
)
PIXELS = bytes(range(256)) * 9  # 48*48 = 2304 bytes, every byte value present
PIXELS2 = PIXELS[::-1]
PIXELS3 = bytes(2304)


def _cids(n: int, stream: str = "cam0") -> tuple[CorrelationId, ...]:
    return tuple(CorrelationId(stream=stream, frame=12, face=i) for i in range(n))


def _job(**kw: object) -> Job:
    fields: dict[str, object] = dict(ids=(CID,), deadline_ms=250, width_px=48, height_px=48, payloads=(PIXELS,))
    fields.update(kw)
    return Job(**fields)


def _face(cid: CorrelationId = CID, label: str = "happy", **kw: object) -> FaceResult:
    fields: dict[str, object] = dict(
        id=cid,
        label=label,
        probabilities={name: (0.94 if name == label else 0.01) for name in LABELS},
        inference_ms=3.25,
    )
    fields.update(kw)
    return FaceResult(**fields)


def _result(faces: tuple[FaceResult, ...] = (), **kw: object) -> Result:
    fields: dict[str, object] = dict(job=17, model=MODEL.ref, worker="pi-kitchen", faces=faces or (_face(),))
    fields.update(kw)
    return Result(**fields)


RESULT = _result()
RESULT3 = _result((_face(CID, "happy"), _face(CID2, "sad", inference_ms=0.0), _face(CID3, "fear")))

SAMPLES = [
    Hello(client="unity-headset 0.3"),
    Hello(),
    Welcome(model=MODEL, workers=2, max_payload_bytes=1 << 20, heartbeat_interval_s=1.0, max_deadline_ms=10000,
            max_queue_jobs=200, max_queue_bytes=4 << 20),
    Welcome(model=None, workers=0, max_payload_bytes=4096, heartbeat_interval_s=0.5, max_deadline_ms=1,
            max_queue_jobs=1, max_queue_bytes=1),
    Ready(worker="pi-kitchen", capacity=4, model=MODEL),
    Ready(worker="pi-kitchen", capacity=16, threads=4, model=MODEL),
    Status(),
    Report.of({"workers": [], "clients": [], "queue": {"jobs": 0}, "counters": {}}),
    _job(),
    _job(job=17, width_px=1, height_px=1, payloads=(b"\xff",)),
    _job(job=18, ids=(CID, CID2, CID3), payloads=(PIXELS, PIXELS2, PIXELS3)),
    _job(ids=_cids(MAX_CROPS), payloads=tuple(bytes([i]) * 2304 for i in range(MAX_CROPS))),
    RESULT,
    RESULT3,
    Heartbeat(),
    Disconnect(reason="shutting down"),
    Disconnect(),
    Expired(ids=(CID,), job=17, reason="deadline passed after 250 ms"),
    Expired(ids=(CID, CID2, CID3), job=18, reason="deadline passed after 250 ms"),
    Busy(ids=(CID,), reason="queue full (64 jobs)"),
    Error(ids=(), reason="header not readable"),
    Error(ids=_cids(MAX_CROPS), job=3, reason="worker lost"),
]


def _good_job_frames() -> list[bytes]:
    return encode(_job(width_px=4, height_px=2, payloads=(bytes(8),)))


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
    assert tag == b"fer-swarm/3" == PROTOCOL_TAG
    assert MAX_CROPS == 16  # fixed by docs/protocol.md; peers in other languages hard-code it
    assert word == b"JOB"
    assert payload == PIXELS
    parsed = json.loads(header)
    assert parsed == {
        "ids": [{"stream": "cam0", "frame": 12, "face": 3}],
        "deadline_ms": 250,
        "width_px": 48,
        "height_px": 48,
        "encoding": "gray8",
        "job": 5,
    }
    assert b" " not in header  # compact separators
    assert encode(Heartbeat()) == [PROTOCOL_TAG, b"HEARTBEAT", b"{}"]


def test_multi_crop_job_has_one_payload_frame_per_id_in_order() -> None:
    job = _job(ids=(CID, CID2, CID3), payloads=(PIXELS, PIXELS2, PIXELS3))
    frames = encode(job)
    assert len(frames) == 6
    assert frames[3:] == [PIXELS, PIXELS2, PIXELS3]
    assert [i["face"] for i in json.loads(frames[2])["ids"]] == [3, 4, 5]
    back = decode(frames)
    assert isinstance(back, Job)
    assert back.ids == (CID, CID2, CID3)
    assert back.payloads == (PIXELS, PIXELS2, PIXELS3)
    # Order is meaning: the same payloads in another order are another job.
    swapped = decode([*frames[:3], PIXELS2, PIXELS, PIXELS3])
    assert swapped.payloads == (PIXELS2, PIXELS, PIXELS3)  # type: ignore[union-attr]
    assert swapped != job


def test_result_ids_are_its_faces_ids_in_order() -> None:
    assert RESULT3.ids == (CID, CID2, CID3)
    assert RESULT.ids == (CID,)
    assert [f.label for f in decode(encode(RESULT3)).faces] == ["happy", "sad", "fear"]  # type: ignore[union-attr]


def _widest_result(stream: str) -> Result:
    """A RESULT for MAX_CROPS faces of the 7-label model with every field as wide as it prints:
    the longest names, the largest numbers, probabilities and times that print with every digit."""
    big = MAX_INT
    faces = tuple(
        FaceResult(
            id=CorrelationId(stream=stream, frame=big, face=big - i),
            label=LABELS[i % len(LABELS)],
            probabilities={name: (k + 1) * 1.2345678901234567e-05 for k, name in enumerate(LABELS)},
            inference_ms=123456.78901234567,
        )
        for i in range(MAX_CROPS)
    )
    return Result(job=big, model="m" * 64 + ":" + "v" * 64, worker="w" * 64, faces=faces)


def test_result_of_max_crops_with_seven_labels_fits_the_header() -> None:
    result = _widest_result("s" * 64)
    frames = encode(result)
    assert len(frames[2]) <= MAX_HEADER_BYTES
    assert decode(frames) == result


def test_every_job_that_decodes_can_be_answered_with_a_result() -> None:
    with pytest.raises(pydantic.ValidationError, match="stream"):  # 64 characters would be 256 bytes of UTF-8
        CorrelationId(stream="\U0001F600" * 64, frame=0, face=0)
    with pytest.raises(pydantic.ValidationError, match="stream"):  # JSON writes a control character as 6 bytes
        CorrelationId(stream="\x01" * 64, frame=0, face=0)
    with pytest.raises(pydantic.ValidationError, match="frame"):  # hundreds of digits would overflow replies
        CorrelationId(stream="s", frame=MAX_INT + 1, face=0)
    stream = '"\\' * 32  # the widest printable ASCII in JSON: every character escaped
    ids = tuple(CorrelationId(stream=stream, frame=MAX_INT, face=MAX_INT - i) for i in range(MAX_CROPS))
    client_job = Job.model_construct(ids=ids, deadline_ms=600_000, width_px=1, height_px=1, encoding="gray8",
                                     job=MAX_INT, payloads=(b"x",) * MAX_CROPS)
    # Everything the broker or a worker may send about this JOB fits the header limit.
    for msg in (client_job, _widest_result(stream),
                *(cls(ids=ids, job=MAX_INT, reason="r" * 500) for cls in (Expired, Busy, Error))):
        assert len(encode(msg)[2]) <= MAX_HEADER_BYTES, type(msg).__name__


def test_decode_accepts_bytes_like_frames() -> None:
    frames = encode(_job(ids=(CID, CID2), payloads=(PIXELS, PIXELS2)))
    for convert in (bytearray, memoryview, zmq.Frame):
        back = decode([convert(f) for f in frames])
        assert back == _job(ids=(CID, CID2), payloads=(PIXELS, PIXELS2))
        assert all(type(b) is bytes for b in back.payloads)  # type: ignore[union-attr]


def test_client_job_may_leave_out_job_number_and_encoding() -> None:
    header = b'{"ids":[{"stream":"s","frame":0,"face":0}],"deadline_ms":1,"width_px":2,"height_px":1}'
    job = decode([PROTOCOL_TAG, b"JOB", header, b"ab"])
    assert isinstance(job, Job)
    assert (job.job, job.encoding, job.payloads) == (None, "gray8", (b"ab",))


def test_failures_name_no_ids_with_an_empty_array_not_by_leaving_it_out() -> None:
    # docs/protocol.md: EXPIRED/BUSY/ERROR ``ids`` is required on the wire, empty when unreadable.
    for cls, word in ((Expired, b"EXPIRED"), (Busy, b"BUSY"), (Error, b"ERROR")):
        msg = decode([PROTOCOL_TAG, word, b'{"ids":[],"reason":"r"}'])
        assert type(msg) is cls
        assert (msg.ids, msg.job, msg.reason) == ((), None, "r")  # type: ignore[union-attr]
        err = _decode_error([PROTOCOL_TAG, word, b'{"reason":"r"}'])
        assert "ids: Field required" in str(err)


def test_messages_are_frozen_and_ids_hashable() -> None:
    with pytest.raises(pydantic.ValidationError):
        CID.frame = 13  # type: ignore[misc]
    twin = CorrelationId(stream="cam0", frame=12, face=3)
    assert {CID: "box"}[twin] == "box"
    assert CID.key() == ("cam0", 12, 3)
    assert MODEL.ref == "fer-vgg:1"
    with pytest.raises(pydantic.ValidationError):
        RESULT.faces[0].label = "sad"  # type: ignore[misc]


def test_job_refuses_payload_of_wrong_size_at_construction() -> None:
    with pytest.raises(pydantic.ValidationError, match="JOB payload 0 is 2303 bytes; expected width_px\\*height_px"):
        _job(payloads=(PIXELS[:-1],))
    with pytest.raises(pydantic.ValidationError, match="JOB payload 2 is 2305 bytes"):
        _job(ids=(CID, CID2, CID3), payloads=(PIXELS, PIXELS2, PIXELS3 + b"x"))


def test_job_refuses_payload_count_not_matching_ids_at_construction() -> None:
    with pytest.raises(pydantic.ValidationError, match="JOB has 2 payload frame\\(s\\) for 3 id\\(s\\)"):
        _job(ids=(CID, CID2, CID3), payloads=(PIXELS, PIXELS2))
    with pytest.raises(pydantic.ValidationError, match="JOB has 0 payload frame\\(s\\) for 1 id\\(s\\)"):
        _job(payloads=())


def test_job_refuses_repeated_ids_and_too_many_crops_at_construction() -> None:
    with pytest.raises(pydantic.ValidationError, match="ids must be unique"):
        _job(ids=(CID, CID2, CID), payloads=(PIXELS,) * 3)
    # Equal by value, not by identity.
    with pytest.raises(pydantic.ValidationError, match="ids must be unique"):
        _job(ids=(CID, CorrelationId(stream="cam0", frame=12, face=3)), payloads=(PIXELS,) * 2)
    with pytest.raises(pydantic.ValidationError, match=f"at most {MAX_CROPS} items"):
        _job(ids=_cids(MAX_CROPS + 1), payloads=(PIXELS,) * (MAX_CROPS + 1))
    with pytest.raises(pydantic.ValidationError, match="at least 1 item"):
        _job(ids=(), payloads=())
    assert len(_job(ids=_cids(MAX_CROPS), payloads=(PIXELS,) * MAX_CROPS).ids) == MAX_CROPS


def test_result_label_must_be_a_class() -> None:
    with pytest.raises(pydantic.ValidationError, match="not a key of probabilities"):
        FaceResult(id=CID, label="bored", probabilities={"happy": 0.5, "sad": 0.5}, inference_ms=1.0)
    with pytest.raises(pydantic.ValidationError, match="probability of 'sad' is -0.1"):
        FaceResult(id=CID, label="happy", probabilities={"happy": 0.5, "sad": -0.1}, inference_ms=1.0)


def test_result_refuses_repeated_missing_or_too_many_faces() -> None:
    with pytest.raises(pydantic.ValidationError, match="ids must be unique"):
        _result((_face(CID), _face(CID2), _face(CID, "sad")))
    with pytest.raises(pydantic.ValidationError, match="at least 1 item"):
        Result(job=1, model="m:1", worker="w", faces=())
    with pytest.raises(pydantic.ValidationError, match=f"at most {MAX_CROPS} items"):
        _result(tuple(_face(c) for c in _cids(MAX_CROPS + 1)))


def test_failures_refuse_repeated_or_too_many_ids() -> None:
    with pytest.raises(pydantic.ValidationError, match="ids must be unique"):
        Busy(ids=(CID, CID), reason="full")
    with pytest.raises(pydantic.ValidationError, match=f"at most {MAX_CROPS} items"):
        Expired(ids=_cids(MAX_CROPS + 1), reason="late")


def test_encode_refuses_oversized_header() -> None:
    probabilities = {f"{i:03d}".ljust(64, "x"): 0.0 for i in range(200)}
    probabilities["000".ljust(64, "x")] = 1.0
    big = FaceResult(id=CID, label="000".ljust(64, "x"), probabilities=probabilities, inference_ms=0.0)
    with pytest.raises(ProtocolError, match=f"limit is {MAX_HEADER_BYTES}") as info:
        encode(Result(model="m:1", worker="w", faces=(big,)))
    assert info.value.command == Command.RESULT  # type: ignore[attr-defined]


def test_error_reply() -> None:
    reply = error_reply(Expired, "x" * 1000, ids=(CID, CID2), job=4)
    assert isinstance(reply, Expired)
    assert (reply.ids, reply.job, len(reply.reason)) == ((CID, CID2), 4, 500)
    assert reply.reason.endswith("...")
    assert decode(encode(reply)) == reply
    bare = error_reply(Error, "unreadable")
    assert (type(bare), bare.ids, bare.job, bare.reason) == (Error, (), None, "unreadable")
    assert json.loads(encode(bare)[2])["ids"] == []
    with pytest.raises(TypeError):
        error_reply(Result, "no")  # type: ignore[arg-type]


# --- rejections --------------------------------------------------------------------------------

JOB_HEADER = _good_job_frames()[2]
CID_JSON = b'{"stream":"cam0","frame":12,"face":3}'
CID2_JSON = b'{"stream":"cam0","frame":12,"face":4}'
CID3_JSON = b'{"stream":"cam0","frame":12,"face":5}'
JOB3_HEADER = JOB_HEADER.replace(CID_JSON, CID_JSON + b"," + CID2_JSON + b"," + CID3_JSON)
assert JOB3_HEADER != JOB_HEADER


def _ids_json(n: int) -> bytes:
    return b",".join(b'{"stream":"cam0","frame":12,"face":%d}' % i for i in range(n))


MALFORMED = {
    "no frames": ([], "empty message"),
    "too few frames": ([PROTOCOL_TAG, b"HELLO"], "2 frame(s); expected at least 3"),
    "bad tag": ([b"zmtp/3", b"HELLO", b"{}"], "bad protocol tag"),
    "old version": ([b"fer-swarm/1", b"HELLO", b"{}"], "unsupported protocol version b'fer-swarm/1'"),
    "old version JOB": (
        [b"fer-swarm/1", b"JOB", JOB_HEADER, bytes(8)],
        "unsupported protocol version b'fer-swarm/1'; this peer speaks fer-swarm/3",
    ),
    "future version": ([b"fer-swarm/4", b"HELLO", b"{}"], "unsupported protocol version b'fer-swarm/4'"),
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
        "ids.0.frame: Input should be greater than or equal to 0",
    ),
    "nested field of a later id": (
        [PROTOCOL_TAG, b"JOB", JOB3_HEADER.replace(b'"face":5', b'"face":"5"'), bytes(8), bytes(8), bytes(8)],
        "ids.2.face: Input should be a valid integer",
    ),
    "version 1 JOB header": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"ids":[' + CID_JSON + b"]", b'"id":' + CID_JSON), bytes(8)],
        "ids: Field required",
    ),
    "single id where ids belong": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b"[" + CID_JSON + b"]", CID_JSON), bytes(8)],
        "ids: Input should be a valid array",
    ),
    "no ids": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(CID_JSON, b""), bytes(8)],
        "ids: Tuple should have at least 1 item",
    ),
    "repeated ids": (
        [PROTOCOL_TAG, b"JOB", JOB3_HEADER.replace(b'"face":5', b'"face":3'), bytes(8), bytes(8), bytes(8)],
        "ids must be unique within one message",
    ),
    "17 ids": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(CID_JSON, _ids_json(MAX_CROPS + 1)), *[bytes(8)] * MAX_CROPS],
        f"ids: Tuple should have at most {MAX_CROPS} items",
    ),
    "unknown extra field": (
        [PROTOCOL_TAG, b"HELLO", b'{"client":"a","colour":"red"}'],
        "colour: Extra inputs are not permitted",
    ),
    "payloads in header": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER[:-1] + b',"payloads":["AAAA"]}', bytes(8)],
        "payloads: Extra inputs are not permitted",
    ),
    "other encoding": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER.replace(b'"gray8"', b'"rgb8"'), bytes(8)],
        "encoding: Input should be 'gray8'",
    ),
    "payload length mismatch": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(9)],
        "JOB payload 0 is 9 bytes; expected width_px*height_px = 4*2 = 8 bytes",
    ),
    "one payload of several the wrong size": (
        [PROTOCOL_TAG, b"JOB", JOB3_HEADER, bytes(8), bytes(7), bytes(8)],
        "JOB payload 1 is 7 bytes; expected width_px*height_px = 4*2 = 8 bytes",
    ),
    "JOB without payload": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER],
        f"JOB takes 1 to {MAX_CROPS} payload frames (one per crop), got 0",
    ),
    "JOB with 17 payloads": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER, *[bytes(8)] * 17],
        "JOB takes 1 to 16 payload frames (one per crop), got 17",
    ),
    "JOB with two payloads for one id": (
        [PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(8), bytes(8)],
        "JOB has 2 payload frame(s) for 1 id(s); expected one per id",
    ),
    "JOB with one payload for three ids": (
        [PROTOCOL_TAG, b"JOB", JOB3_HEADER, bytes(8)],
        "JOB has 1 payload frame(s) for 3 id(s); expected one per id",
    ),
    "payload on HEARTBEAT": (
        [PROTOCOL_TAG, b"HEARTBEAT", b"{}", b"x"],
        "HEARTBEAT takes no payload frames, got 1",
    ),
    "payload on RESULT": (
        [PROTOCOL_TAG, b"RESULT", encode(RESULT)[2], b"x"],
        "RESULT takes no payload frames, got 1",
    ),
    "probability out of 0..1": (
        [PROTOCOL_TAG, b"RESULT", encode(RESULT)[2].replace(b'"happy":0.94', b'"happy":1.5')],
        "probability of 'happy' is 1.5",
    ),
    "RESULT label not a class": (
        [PROTOCOL_TAG, b"RESULT", encode(RESULT)[2].replace(b'"label":"happy"', b'"label":"bored"')],
        "label 'bored' is not a key of probabilities",
    ),
    "RESULT in version 1 shape": (
        [PROTOCOL_TAG, b"RESULT", b'{"id":' + CID_JSON + b',"job":1,"label":"a","probabilities":{"a":1.0,"b":0.0},'
         b'"model":"m:1","worker":"w","inference_ms":1.0}'],
        "faces: Field required",
    ),
    "RESULT without faces": (
        [PROTOCOL_TAG, b"RESULT", b'{"job":1,"model":"m:1","worker":"w","faces":[]}'],
        "faces: Tuple should have at least 1 item",
    ),
    "RESULT with repeated face ids": (
        [PROTOCOL_TAG, b"RESULT", encode(RESULT3)[2].replace(b'"face":5', b'"face":4')],
        "ids must be unique within one message",
    ),
    "EXPIRED with repeated ids": (
        [PROTOCOL_TAG, b"EXPIRED", b'{"ids":[' + CID_JSON + b"," + CID_JSON + b'],"reason":"late"}'],
        "ids must be unique within one message",
    ),
    "ERROR with 17 ids": (
        [PROTOCOL_TAG, b"ERROR", b'{"ids":[' + _ids_json(MAX_CROPS + 1) + b'],"reason":"x"}'],
        f"ids: Tuple should have at most {MAX_CROPS} items",
    ),
    "BUSY in version 1 shape": (
        [PROTOCOL_TAG, b"BUSY", b'{"id":' + CID_JSON + b',"reason":"full"}'],
        "id: Extra inputs are not permitted",
    ),
}


@pytest.mark.parametrize(("frames", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_is_rejected_with_reason(frames: list[bytes], reason: str) -> None:
    err = _decode_error(frames)
    assert reason in str(err)
    assert err.identity is None  # type: ignore[attr-defined]
    assert isinstance(err.ids, tuple)  # type: ignore[attr-defined]


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
    assert f"JOB payload 0 is {len(PIXELS)} bytes; limit is {len(PIXELS) - 1}" in str(err)
    assert decode(frames, max_payload_bytes=len(PIXELS)) == _job()


def test_payload_over_limit_among_several_is_named_by_index() -> None:
    # All crops must be the same size, so only a frame that is both oversized and wrong-sized
    # can be the one over the limit; the limit is checked first and names it.
    frames = [PROTOCOL_TAG, b"JOB", JOB3_HEADER, bytes(8), bytes(8), bytes(100)]
    err = _decode_error(frames, max_payload_bytes=50)
    assert "JOB payload 2 is 100 bytes; limit is 50" in str(err)
    assert err.ids == (CID, CID2, CID3)  # type: ignore[attr-defined]
    frames[5] = bytes(8)
    assert decode(frames, max_payload_bytes=8).payloads == (bytes(8),) * 3  # type: ignore[union-attr]


def test_ids_recovered_from_job_that_fails_on_another_field() -> None:
    header = JOB_HEADER.replace(b'"width_px":4', b'"width_px":0').replace(b'"job":null', b'"job":41')
    err = _decode_error([PROTOCOL_TAG, b"JOB", header, bytes(8)])
    assert "width_px" in str(err)
    assert (err.command, err.ids, err.job) == (Command.JOB, (CID,), 41)  # type: ignore[attr-defined]
    header3 = JOB3_HEADER.replace(b'"deadline_ms":250', b'"deadline_ms":0').replace(b'"job":null', b'"job":7')
    err = _decode_error([PROTOCOL_TAG, b"JOB", header3, bytes(8), bytes(8), bytes(8)])
    assert "deadline_ms" in str(err)
    assert (err.command, err.ids, err.job) == (Command.JOB, (CID, CID2, CID3), 7)  # type: ignore[attr-defined]


def test_ids_recovered_on_payload_errors() -> None:
    err = _decode_error([PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(7)])
    assert err.ids == (CID,)  # type: ignore[attr-defined]
    err = _decode_error([PROTOCOL_TAG, b"JOB", JOB_HEADER, bytes(8)], max_payload_bytes=4)
    assert err.ids == (CID,)  # type: ignore[attr-defined]
    err = _decode_error([PROTOCOL_TAG, b"JOB", JOB3_HEADER, bytes(8), bytes(8), bytes(9)])
    assert "JOB payload 2 is 9 bytes" in str(err)
    assert err.ids == (CID, CID2, CID3)  # type: ignore[attr-defined]


@pytest.mark.parametrize("payloads", [0, 1, 2, 4, MAX_CROPS + 1], ids=lambda n: f"{n} payloads")
def test_ids_recovered_when_payload_count_does_not_match(payloads: int) -> None:
    header = JOB3_HEADER.replace(b'"job":null', b'"job":9')
    err = _decode_error([PROTOCOL_TAG, b"JOB", header, *[bytes(8)] * payloads])
    assert "payload frame" in str(err)
    assert str(payloads) in str(err)
    assert (err.command, err.ids, err.job) == (Command.JOB, (CID, CID2, CID3), 9)  # type: ignore[attr-defined]


def test_ids_recovered_from_bad_result_and_failures() -> None:
    bad = encode(RESULT3)[2].replace(b'"worker":"pi-kitchen"', b'"worker":""')
    err = _decode_error([PROTOCOL_TAG, b"RESULT", bad])
    assert "worker" in str(err)
    # RESULT has no top-level ids; the job number is still salvaged.
    assert (err.command, err.ids, err.job) == (Command.RESULT, (), 17)  # type: ignore[attr-defined]
    err = _decode_error([PROTOCOL_TAG, b"BUSY", b'{"ids":[' + CID_JSON + b',' + CID2_JSON + b'],"reason":7}'])
    assert (err.command, err.ids) == (Command.BUSY, (CID, CID2))  # type: ignore[attr-defined]


UNREADABLE_IDS = {
    "invalid stream": JOB_HEADER.replace(b'"stream":"cam0"', b'"stream":""'),
    "one invalid among several": JOB3_HEADER.replace(b'"face":5', b'"face":-5'),
    "repeated": JOB3_HEADER.replace(b'"face":5', b'"face":3'),
    "too many": JOB_HEADER.replace(CID_JSON, _ids_json(MAX_CROPS + 1)),
    "a single object": JOB_HEADER.replace(b"[" + CID_JSON + b"]", CID_JSON),
    "a string": JOB_HEADER.replace(b"[" + CID_JSON + b"]", b'"cam0"'),
    "a number": JOB_HEADER.replace(b"[" + CID_JSON + b"]", b"3"),
    "null": JOB_HEADER.replace(b"[" + CID_JSON + b"]", b"null"),
    "version 1 id": JOB_HEADER.replace(b'"ids":[' + CID_JSON + b"]", b'"id":' + CID_JSON),
    "not JSON": b"{not json",
    "an array": b"[" + CID_JSON + b"]",
}


@pytest.mark.parametrize("header", UNREADABLE_IDS.values(), ids=UNREADABLE_IDS.keys())
def test_ids_are_empty_when_unreadable(header: bytes) -> None:
    err = _decode_error([PROTOCOL_TAG, b"JOB", header, bytes(8)])
    assert (err.command, err.ids) == (Command.JOB, ())  # type: ignore[attr-defined]


def test_nothing_recovered_before_the_command_is_read() -> None:
    err = _decode_error([b"fer-swarm/1", b"JOB", JOB_HEADER, bytes(8)])
    assert (err.command, err.ids, err.job) == (None, (), None)  # type: ignore[attr-defined]
    err = _decode_error([b"fer-swarm/4", b"JOB", JOB_HEADER, bytes(8)])
    assert (err.command, err.ids, err.job) == (None, (), None)  # type: ignore[attr-defined]
    err = _decode_error([PROTOCOL_TAG, b"JOBS", JOB_HEADER, bytes(8)])
    assert (err.command, err.ids, err.job) == (None, (), None)  # type: ignore[attr-defined]


def test_decode_routed_keeps_identity_on_error() -> None:
    identity, msg = decode_routed([b"\x00k\x8b\x45\x67", *encode(Heartbeat())])
    assert (identity, msg) == (b"\x00k\x8b\x45\x67", Heartbeat())
    with pytest.raises(ProtocolError, match="unknown command") as info:
        decode_routed([b"edge-1", PROTOCOL_TAG, b"NOPE", b"{}"])
    assert info.value.identity == b"edge-1"  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="empty message") as info:
        decode_routed([b"edge-1"])
    assert info.value.identity == b"edge-1"  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="payload 1 is 7 bytes") as info:
        decode_routed([b"edge-1", PROTOCOL_TAG, b"JOB", JOB3_HEADER, bytes(8), bytes(7), bytes(8)])
    assert (info.value.identity, info.value.ids) == (b"edge-1", (CID, CID2, CID3))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "frames", [[], encode(Heartbeat()), [b"", *encode(Heartbeat())]], ids=["no frames", "tag first", "empty identity"]
)
def test_decode_routed_without_identity(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError, match="routing identity") as info:
        decode_routed(frames)
    assert info.value.identity is None  # type: ignore[attr-defined]
    assert info.value.ids == ()  # type: ignore[attr-defined]


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
    dealer.send_multipart([PROTOCOL_TAG, b"JOB", JOB3_HEADER, bytes(8), bytes(5), bytes(8)])
    with pytest.raises(ProtocolError) as info:
        decode_routed(router.recv_multipart())
    err = info.value
    assert err.identity == b"edge-1"  # type: ignore[attr-defined]
    answer = error_reply(Error, str(err), ids=err.ids)  # type: ignore[attr-defined]
    router.send_multipart(encode_routed(err.identity, answer))  # type: ignore[attr-defined]
    reply = decode(dealer.recv_multipart())
    assert isinstance(reply, Error)
    assert reply.ids == (CID, CID2, CID3)
    assert "payload 1 is 5 bytes" in reply.reason
