"""The fer-swarm wire format: ZeroMQ multipart frames <-> frozen, typed messages.

No sockets here; this module only turns frames into messages and back.
``docs/protocol.md`` is the language-neutral specification; this docstring is
the layout as this code packs it.

Frame layout (after the routing identity a ROUTER socket adds on receive and
strips on send; DEALER peers send no empty delimiter frame)::

    frame 0   b"fer-swarm/3"        protocol tag and version, ASCII
    frame 1   b"JOB"                command, an ASCII upper-case word
    frame 2   b'{"ids":[...],...}'  header: one UTF-8 JSON object, <= 8192 bytes
    frame 3.. b"\\x00\\x17..."         payloads: JOB: one frame per crop (1..16, as many as ``ids``),
                                    each width_px*height_px gray8 bytes, row-major;
                                    REPORT: one frame, the broker's status as a UTF-8 JSON object

A ROUTER socket sees ``[identity, frame 0, frame 1, frame 2, ...]``; use
``decode_routed``/``encode_routed`` there and ``decode``/``encode`` on DEALER
sockets.

Commands (header fields in the model of the same name below)::

    HELLO       client -> broker            asks for the pool's model
    WELCOME     broker -> client            model, worker count, limits
    READY       worker -> broker            registration: name, capacity, model
    JOB         client -> broker -> worker  1..16 face crops (+ 1 payload frame each)
    RESULT      worker -> broker -> client  label and probabilities for each crop of one job
    HEARTBEAT   any -> any                  liveness, header {}
    DISCONNECT  any -> any                  the sender is leaving / drop the peer
    EXPIRED     broker -> client            deadline passed before a result
    BUSY        broker -> client            queue full, job not accepted
    ERROR       broker|worker -> client     job malformed or failed, with reason
    STATUS      client -> broker            asks for the broker's status (operators' tools)
    REPORT      broker -> client            the status: workers, clients, queue, counters, latency

One JOB carries the crops of one frame (or any crops of the same size) so that
each hop pays its per-message cost once per frame, not once per face; every
JOB gets exactly one terminal reply, which names all of the JOB's crops.

Headers are decoded with pydantic in strict mode: a JSON string is not an
integer, an array is accepted where a tuple is declared. Unknown header fields
are rejected, so a typo fails loudly instead of falling back to a default.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ProtocolError
from .framing import Framing

__all__ = [
    "MAX_CROPS", "MAX_HEADER_BYTES", "MAX_INT", "PROTOCOL_TAG", "Command", "CorrelationId", "ModelInfo", "Message",
    "Hello", "Welcome", "Ready", "Job", "FaceResult", "Result", "Heartbeat", "Disconnect", "Expired", "Busy", "Error",
    "Status", "Report", "MAX_REPORT_BYTES",
    "encode", "decode", "encode_routed", "decode_routed", "error_reply",
]

PROTOCOL_TAG = b"fer-swarm/3"
MAX_HEADER_BYTES = 8192
MAX_INT = 2**53 - 1  # integers in headers stay exact in every JSON parser (JavaScript, C# double)
MAX_CROPS = 16  # crops in one JOB; a RESULT for 16 faces of a 7-class model stays well under the header limit
MAX_REASON_CHARS = 500
MAX_REPORT_BYTES = 1 << 20  # a REPORT's JSON: room for the status of hundreds of workers and clients
_TAG_PREFIX = b"fer-swarm/"


class Command(str, enum.Enum):
    """Frame 1 of every message; the value is the ASCII word on the wire."""

    HELLO = "HELLO"
    WELCOME = "WELCOME"
    READY = "READY"
    JOB = "JOB"
    RESULT = "RESULT"
    HEARTBEAT = "HEARTBEAT"
    DISCONNECT = "DISCONNECT"
    EXPIRED = "EXPIRED"
    BUSY = "BUSY"
    ERROR = "ERROR"
    STATUS = "STATUS"
    REPORT = "REPORT"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class CorrelationId(_Frozen):
    """Names one face crop: which stream, which frame of it, which face in the frame.

    The client chooses it; the broker and workers echo it untouched, so replies
    that come back in any order can be matched to the face they answer.
    """

    # Printable ASCII (at most 128 bytes of JSON) and integers up to MAX_INT, so any reply naming
    # MAX_CROPS ids, a RESULT included, fits the header limit: every JOB that decodes can be answered.
    stream: str = Field(min_length=1, max_length=64, pattern=r"^[ -~]+$",
                        description="client-chosen stream name, printable ASCII")
    frame: int = Field(ge=0, le=MAX_INT, description="frame number within the stream")
    face: int = Field(ge=0, le=MAX_INT, description="face index within the frame")

    def key(self) -> tuple[str, int, int]:
        """``(stream, frame, face)``, for dicts and sorting."""
        return (self.stream, self.frame, self.face)


class ModelInfo(_Frozen):
    """What a worker runs, announced in READY and passed on to clients in WELCOME."""

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    input_shape: tuple[int, ...] = Field(min_length=1, max_length=8, description="model input tensor shape")
    labels: tuple[str, ...] = Field(min_length=2, max_length=256, description="class names in output order")
    width_px: int = Field(ge=1, le=4096, description="crop width a JOB must have")
    height_px: int = Field(ge=1, le=4096, description="crop height a JOB must have")
    encoding: Literal["gray8"] = "gray8"
    framing: dict[str, Framing] = Field(
        default_factory=dict, max_length=8,
        description="per detector name, how its box maps to the crop the model was trained on; "
                    "empty: the client's defaults",
    )

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        return labels

    @property
    def ref(self) -> str:
        """``"name:version"``, the form RESULT.model carries."""
        return f"{self.name}:{self.version}"


class Hello(_Frozen):
    """Client -> broker: asks for the pool's model and limits; answered by WELCOME."""

    command: ClassVar[Command] = Command.HELLO
    client: str = Field("", max_length=64, description="free text naming the client, for logs")


class Welcome(_Frozen):
    """Broker -> client: the answer to HELLO."""

    command: ClassVar[Command] = Command.WELCOME
    model: ModelInfo | None = Field(description="the pool's model; null while no worker is registered")
    workers: int = Field(ge=0, description="workers registered now")
    max_payload_bytes: int = Field(ge=1, description="largest JOB payload frame (one crop) the broker accepts")
    heartbeat_interval_s: float = Field(gt=0, description="each side sends HEARTBEAT this often")
    max_deadline_ms: int = Field(ge=1, description="longer JOB deadlines are cut to this")
    max_queue_jobs: int = Field(ge=1, description="JOBs of this client the broker holds waiting; beyond, BUSY")
    max_queue_bytes: int = Field(ge=1, description="bytes of pixels of this client the broker holds waiting; beyond, BUSY")


class Ready(_Frozen):
    """Worker -> broker: registration; sent on connect and after every reconnect."""

    command: ClassVar[Command] = Command.READY
    worker: str = Field(min_length=1, max_length=64, description="worker name, unique in the pool")
    capacity: int = Field(ge=1, le=1024, description="JOBs the worker can hold at once")
    threads: int | None = Field(None, ge=1, le=1024,
                                description="JOBs it works on at the same time; null: half of capacity, rounded up")
    model: ModelInfo

    @property
    def concurrency(self) -> int:
        return min(self.capacity, self.threads or (self.capacity + 1) // 2)


def _unique_ids(ids: tuple[CorrelationId, ...]) -> tuple[CorrelationId, ...]:
    if len({i.key() for i in ids}) != len(ids):
        raise ValueError("ids must be unique within one message")
    return ids


class _JobHeader(_Frozen):
    """JOB's header fields: what frame 2 of a JOB is validated against."""

    ids: tuple[CorrelationId, ...] = Field(min_length=1, max_length=MAX_CROPS,
                                           description="one id per crop, in payload order")
    deadline_ms: int = Field(ge=1, le=600_000, description="ms the receiver has, counted from receipt")
    width_px: int = Field(ge=1, le=4096, description="width of every crop in the JOB")
    height_px: int = Field(ge=1, le=4096, description="height of every crop in the JOB")
    encoding: Literal["gray8"] = "gray8"
    job: int | None = Field(None, ge=0, le=MAX_INT, description="broker's job number; set by the broker, not clients")

    _ids_unique = field_validator("ids")(_unique_ids)


class Job(_JobHeader):
    """Face crops to classify, all of one size: client -> broker -> worker.

    ``payloads[i]`` is the crop ``ids[i]`` names; each travels in its own frame, never in the header.
    """

    command: ClassVar[Command] = Command.JOB
    payloads: tuple[bytes, ...] = Field(repr=False, description="row-major 8-bit gray pixels, one per id")

    @model_validator(mode="after")
    def _payloads_match(self) -> Job:
        reason = _payloads_mismatch(self.width_px, self.height_px, len(self.ids), [len(b) for b in self.payloads])
        if reason:
            raise ValueError(reason)
        return self


class FaceResult(_Frozen):
    """The classification of one crop, inside a RESULT."""

    id: CorrelationId
    label: str = Field(min_length=1, max_length=64, description="the most probable class")
    probabilities: dict[str, float] = Field(min_length=2, max_length=256, description="every class, 0..1")
    inference_ms: float = Field(ge=0, description="time the model took for this crop")

    @model_validator(mode="after")
    def _label_is_a_class(self) -> FaceResult:
        if self.label not in self.probabilities:
            raise ValueError(f"label {self.label!r} is not a key of probabilities")
        for name, p in self.probabilities.items():
            if not 0.0 <= p <= 1.0:  # also rejects NaN
                raise ValueError(f"probability of {name!r} is {p}, not in 0..1")
        return self


class Result(_Frozen):
    """Worker -> broker -> client: the classification of every crop of one JOB."""

    command: ClassVar[Command] = Command.RESULT
    job: int | None = Field(None, ge=0, le=MAX_INT)
    model: str = Field(min_length=3, max_length=129, description='"name:version" of the model used')
    worker: str = Field(min_length=1, max_length=64)
    faces: tuple[FaceResult, ...] = Field(min_length=1, max_length=MAX_CROPS, description="one per crop of the JOB")

    @field_validator("faces")
    @classmethod
    def _faces_unique(cls, faces: tuple[FaceResult, ...]) -> tuple[FaceResult, ...]:
        _unique_ids(tuple(f.id for f in faces))
        return faces

    @property
    def ids(self) -> tuple[CorrelationId, ...]:
        return tuple(f.id for f in self.faces)


class Heartbeat(_Frozen):
    """Any peer -> any peer: "I am alive". Header ``{}``."""

    command: ClassVar[Command] = Command.HEARTBEAT


class Disconnect(_Frozen):
    """Any peer -> any peer: the sender is leaving, or tells the receiver it is no longer known."""

    command: ClassVar[Command] = Command.DISCONNECT
    reason: str = Field("", max_length=MAX_REASON_CHARS)


class _JobFailure(_Frozen):
    ids: tuple[CorrelationId, ...] = Field(max_length=MAX_CROPS,
                                           description="the JOB's ids; empty when they could not be read")
    job: int | None = Field(None, ge=0, le=MAX_INT)
    reason: str = Field(max_length=MAX_REASON_CHARS)

    _ids_unique = field_validator("ids")(_unique_ids)


class Expired(_JobFailure):
    """Terminal reply: the job's deadline passed before a result."""

    command: ClassVar[Command] = Command.EXPIRED


class Busy(_JobFailure):
    """Terminal reply: the broker's queue is full; the job was not accepted."""

    command: ClassVar[Command] = Command.BUSY


class Error(_JobFailure):
    """Terminal reply: the job was malformed or its processing failed."""

    command: ClassVar[Command] = Command.ERROR


class Status(_Frozen):
    """Client -> broker: asks for the broker's status. Header ``{}``; answered by REPORT."""

    command: ClassVar[Command] = Command.STATUS


class Report(_Frozen):
    """Broker -> client: the broker's status, a JSON object in the one payload frame (header ``{}``).

    docs/protocol.md lists its fields; :meth:`of` builds one, :attr:`status` reads it.
    """

    command: ClassVar[Command] = Command.REPORT
    body: bytes = Field(repr=False, max_length=MAX_REPORT_BYTES, description="UTF-8 JSON object")

    @classmethod
    def of(cls, status: dict[str, Any]) -> Report:
        return cls(body=json.dumps(status, separators=(",", ":"), allow_nan=False).encode())

    @property
    def status(self) -> dict[str, Any]:
        data = json.loads(self.body)
        if not isinstance(data, dict):
            raise ValueError("REPORT body is not a JSON object")
        return data


Message = Hello | Welcome | Ready | Job | Result | Heartbeat | Disconnect | Expired | Busy | Error | Status | Report

_CLASSES: dict[bytes, type[_Frozen]] = {
    cls.command.value.encode("ascii"): cls
    for cls in (Hello, Welcome, Ready, Job, Result, Heartbeat, Disconnect, Expired, Busy, Error, Status, Report)
}


_VALUES = frozenset(_CLASSES.values())
_WIRE = {cls: word for word, cls in _CLASSES.items()}
# What frame 2 is validated against, per command (REPORT's header is ``{}``, like STATUS's).
_HEADERS: dict[bytes, type[_Frozen]] = {**_CLASSES, b"JOB": _JobHeader, b"REPORT": Status}


def _payloads_mismatch(width_px: int, height_px: int, crops: int, sizes: list[int]) -> str:
    if len(sizes) != crops:
        return f"JOB has {len(sizes)} payload frame(s) for {crops} id(s); expected one per id"
    expected = width_px * height_px
    for i, actual in enumerate(sizes):
        if actual != expected:
            return (
                f"JOB payload {i} is {actual} bytes; expected width_px*height_px = "
                f"{width_px}*{height_px} = {expected} bytes of gray8"
            )
    return ""


def _fail(reason: str, *, command: Command | None = None, ids: tuple[CorrelationId, ...] = (),
          job: int | None = None) -> ProtocolError:
    """A ProtocolError carrying the attributes ``decode`` documents (set on the instance:
    errors.py keeps the exception hierarchy free of wire details)."""
    err = ProtocolError(reason)
    err.command = command  # type: ignore[attr-defined]
    err.ids = ids  # type: ignore[attr-defined]
    err.job = job  # type: ignore[attr-defined]
    err.identity = None  # type: ignore[attr-defined]
    return err


def _as_bytes(frame: Any) -> bytes:
    if type(frame) is bytes:
        return frame
    data = getattr(frame, "bytes", None)  # zmq.Frame / zmq.Message
    if isinstance(data, bytes):
        return data
    try:
        return bytes(frame)
    except TypeError as e:
        raise _fail(f"frame of type {type(frame).__name__} is not bytes-like") from e


def _show(data: bytes | str, limit: int = 32) -> str:
    if isinstance(data, str):
        return data if len(data) <= limit else data[:limit] + "..."
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


def encode(msg: Message) -> list[bytes]:
    """Frames for ``msg``, without a routing identity: ``[tag, command, header, *payload]``.

    Raises ProtocolError if the header would exceed MAX_HEADER_BYTES.
    """
    cls = type(msg)
    if cls is Job:
        header = msg.model_dump_json(exclude={"payloads"}).encode()
        tail = list(msg.payloads)
    elif cls is Report:
        header, tail = b"{}", [msg.body]
    elif cls in _VALUES:
        header = msg.model_dump_json().encode()
        tail = []
    else:
        raise TypeError(f"not a fer-swarm message: {cls.__name__}")
    if len(header) > MAX_HEADER_BYTES:
        raise _fail(
            f"{msg.command.value} header is {len(header)} bytes; limit is {MAX_HEADER_BYTES}",
            command=msg.command,
        )
    return [PROTOCOL_TAG, _WIRE[cls], header, *tail]


def encode_routed(identity: bytes, msg: Message) -> list[bytes]:
    """``[identity, *encode(msg)]``, for sending on a ROUTER socket."""
    return [identity, *encode(msg)]


def decode(frames: Sequence[Any], *, max_payload_bytes: int = 1 << 20) -> Message:
    """The message in ``frames`` (no routing identity), validated.

    Frames may be bytes, bytearray, memoryview or zmq.Frame. Anything that does
    not follow the layout in this module's docstring raises ProtocolError whose
    message is a human-readable reason. Every ProtocolError raised here carries
    these attributes, so the receiver can answer the sender:

    - ``command``: the Command, once frame 1 was read;
    - ``ids``: the header's ``ids`` (a tuple, empty when unknown), if they could
      be read even though another part of the message was wrong (best effort);
    - ``job``: the header's ``job`` number, likewise;
    - ``identity``: always None here; set by ``decode_routed``.
    """
    n = len(frames)
    if n == 0:
        raise _fail("empty message: expected at least 3 frames (tag, command, header)")
    tag = _as_bytes(frames[0])
    if tag != PROTOCOL_TAG:
        raise _fail(_tag_problem(tag))
    if n < 3:
        raise _fail(f"message has {n} frame(s); expected at least 3 (tag, command, header)")
    word = _as_bytes(frames[1])
    header_cls = _HEADERS.get(word)
    if header_cls is None:
        raise _fail(f"unknown command {_show(word)}")
    cls = _CLASSES[word]
    header = _as_bytes(frames[2])
    try:
        return _decode_body(cls, header_cls, header, frames, max_payload_bytes)
    except ProtocolError as err:
        err.command = cls.command  # type: ignore[attr-defined]
        if not err.ids:  # type: ignore[attr-defined]
            err.ids, err.job = _salvage(header)  # type: ignore[attr-defined]
        raise


def _decode_body(
    cls: type[_Frozen], header_cls: type[_Frozen], header: bytes, frames: Sequence[Any], max_payload_bytes: int
) -> Message:
    name = cls.command.value  # type: ignore[attr-defined]
    payloads = len(frames) - 3
    if len(header) > MAX_HEADER_BYTES:
        raise _fail(f"{name} header is {len(header)} bytes; limit is {MAX_HEADER_BYTES}")
    if cls is Job:
        if not 1 <= payloads <= MAX_CROPS:
            raise _fail(f"JOB takes 1 to {MAX_CROPS} payload frames (one per crop), got {payloads}")
        crops = [_as_bytes(f) for f in frames[3:]]
        for i, crop in enumerate(crops):
            if len(crop) > max_payload_bytes:
                raise _fail(f"JOB payload {i} is {len(crop)} bytes; limit is {max_payload_bytes}")
    elif cls is Report:
        if payloads != 1:
            raise _fail(f"REPORT takes exactly 1 payload frame (its JSON), got {payloads}")
        body = _as_bytes(frames[3])
        if len(body) > MAX_REPORT_BYTES:
            raise _fail(f"REPORT payload is {len(body)} bytes; limit is {MAX_REPORT_BYTES}")
    elif payloads:
        raise _fail(f"{name} takes no payload frames, got {payloads}")
    try:
        parsed = header_cls.model_validate_json(header, strict=True)
    except ValidationError as e:
        raise _fail(_header_problem(name, header, e)) from None
    if cls is Report:
        return Report(body=body)
    if cls is not Job:
        return parsed  # type: ignore[return-value]
    reason = _payloads_mismatch(parsed.width_px, parsed.height_px,  # type: ignore[attr-defined]
                                len(parsed.ids), [len(c) for c in crops])  # type: ignore[attr-defined]
    if reason:
        raise _fail(reason, ids=parsed.ids, job=parsed.job)  # type: ignore[attr-defined]
    # Validated above, field by field: build without validating the header a second time.
    return Job.model_construct(**parsed.__dict__, payloads=tuple(crops))


def _tag_problem(tag: bytes) -> str:
    if tag.strip() == PROTOCOL_TAG:
        return f"protocol tag {_show(tag)} has white space around it; send exactly {PROTOCOL_TAG.decode()!r}"
    if tag.startswith(_TAG_PREFIX):
        return f"unsupported protocol version {_show(tag)}; this peer speaks {PROTOCOL_TAG.decode()}"
    if tag == b"":
        return (
            "empty frame where the protocol tag belongs "
            "(a REQ/REP socket adds an empty delimiter; use DEALER)"
        )
    return f"bad protocol tag {_show(tag)}; expected {PROTOCOL_TAG!r}"


def _header_problem(name: str, header: bytes, e: ValidationError) -> str:
    errors = e.errors(include_url=False, include_context=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        try:
            header.decode("utf-8")
        except UnicodeDecodeError as u:
            return f"{name} header is not UTF-8: {u.reason} at byte {u.start}"
        return f"{name} header is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    if first["type"] == "model_type" and not first["loc"]:
        kind = type(first["input"]).__name__
        return f"{name} header is not a JSON object (got {_JSON_KIND.get(kind, kind)})"
    parts = []
    for item in errors[:3]:
        if not item["loc"]:  # a rule spanning fields, e.g. "label is a key of probabilities"
            parts.append(item["msg"].removeprefix("Value error, "))
            continue
        where = ".".join(str(p) for p in item["loc"])
        got = "" if item["type"] == "missing" else f" (got {_show(repr(item['input']))})"
        parts.append(f"{where}: {item['msg']}{got}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"invalid {name} header: " + "; ".join(parts) + more


_JSON_KIND = {"list": "array", "str": "string", "int": "number", "float": "number", "bool": "boolean"}


def _salvage(header: bytes) -> tuple[tuple[CorrelationId, ...], int | None]:
    """Best effort: the ``ids`` and ``job`` of a header that failed for another reason."""
    if len(header) > MAX_HEADER_BYTES:
        return (), None
    try:
        data = json.loads(header)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return (), None
    if not isinstance(data, dict):
        return (), None
    ids = data.get("ids")
    try:
        ids = _unique_ids(tuple(CorrelationId.model_validate(i, strict=True) for i in ids[:MAX_CROPS + 1]))
        if len(ids) > MAX_CROPS:
            ids = ()
    except (TypeError, ValueError):  # not a list, an invalid id, or repeated ids
        ids = ()
    job = data.get("job")
    if type(job) is not int or not 0 <= job <= MAX_INT:
        job = None
    return ids, job


def decode_routed(frames: Sequence[Any], **kw: Any) -> tuple[bytes, Message]:
    """``(identity, message)`` from a ROUTER socket's frames; ``kw`` goes to ``decode``.

    A ProtocolError for a message whose identity frame was present has
    ``.identity`` set, so the broker can answer (or drop) that sender.
    """
    if not frames:
        raise _fail("empty message: no routing identity")
    identity = _as_bytes(frames[0])
    if not identity or identity == PROTOCOL_TAG:
        # ROUTER sockets never deliver an empty identity; a tag here means none was added.
        raise _fail("missing routing identity frame")
    try:
        return identity, decode(frames[1:], **kw)
    except ProtocolError as err:
        err.identity = identity  # type: ignore[attr-defined]
        raise


def error_reply(
    cls: type[Expired] | type[Busy] | type[Error],
    reason: str,
    ids: tuple[CorrelationId, ...] = (),
    job: int | None = None,
) -> Expired | Busy | Error:
    """A terminal error reply; ``reason`` is cut to the 500 characters the header allows."""
    if cls not in (Expired, Busy, Error):
        raise TypeError(f"{cls.__name__} is not a terminal error reply")
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return cls(ids=ids, job=job, reason=reason)
