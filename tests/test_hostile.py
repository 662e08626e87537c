"""Hostile input against a live broker process and a live worker process.

Property-based: hypothesis generates random and mutated multipart messages
(wrong frame counts, other versions, truncated headers, huge declared sizes,
non-UTF-8, wrong pixel counts, out-of-range fields, JOBs with 0, 1, several
or 17 payload frames, repeated or too many ids) and the test sends every one
to the broker as a client, to the broker as a worker, and to a worker as its
broker. Neither process may die, a well-formed job afterwards must still be
answered, and the broker's memory must stay bounded.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from fer_swarm import protocol as p

from .swarm import BrokerThread, Client, WorkerProcess, free_port, real_faces, zmq_context

MESSAGES_PER_EXAMPLE = 25
EXAMPLES = 600  # at least 10,000 distinct messages in practice (hypothesis may stop early), each sent to three targets

CID = p.CorrelationId(stream="fuzz", frame=1, face=0)
CID2 = p.CorrelationId(stream="fuzz", frame=1, face=1)
CID3 = p.CorrelationId(stream="fuzz", frame=1, face=2)
MODEL = p.ModelInfo(name="m", version="1", input_shape=(1, 48, 48, 1), labels=("a", "b"), width_px=48, height_px=48)


def _face(cid: p.CorrelationId) -> p.FaceResult:
    return p.FaceResult(id=cid, label="a", probabilities={"a": 0.6, "b": 0.4}, inference_ms=1.0)


VALID = [
    p.encode(p.Job(ids=(CID,), deadline_ms=50, width_px=48, height_px=48, payloads=(bytes(2304),))),
    p.encode(p.Job(ids=(CID, CID2, CID3), deadline_ms=50, width_px=48, height_px=48,
                   payloads=(bytes(2304), bytes(range(256)) * 9, b"\xff" * 2304))),
    p.encode(p.Hello(client="fuzz")),
    p.encode(p.Heartbeat()),
    p.encode(p.Ready(worker="fuzz", capacity=2, model=MODEL)),
    p.encode(p.Result(job=1, model="m:1", worker="w", faces=(_face(CID),))),
    p.encode(p.Result(job=2, model="m:1", worker="w", faces=(_face(CID), _face(CID2)))),
    p.encode(p.Disconnect(reason="fuzz")),
    p.encode(p.Error(ids=(CID,), job=1, reason="fuzz")),
    p.encode(p.Busy(ids=(), reason="fuzz")),
]
# The same JOB as version 1 framed it: the old tag, and the old header under the new tag.
V1_HEADER = b'{"id":{"stream":"fuzz","frame":1,"face":0},"deadline_ms":50,"width_px":48,"height_px":48}'
LEGACY = [
    [b"fer-swarm/1", b"JOB", V1_HEADER, bytes(2304)],
    [p.PROTOCOL_TAG, b"JOB", V1_HEADER, bytes(2304)],
    [b"fer-swarm/1", b"RESULT", b'{"id":{"stream":"fuzz","frame":1,"face":0},"label":"a","probabilities":{"a":1.0,"b":0.0},'
                                b'"model":"m:1","worker":"w","inference_ms":1.0}'],
]
PAYLOAD_COUNTS = [0, 1, 2, 3, p.MAX_CROPS, p.MAX_CROPS + 1]  # 17: one more crop than a JOB may carry

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# CorrelationId-shaped JSON, valid or just off: empty or over-long streams, negative or huge numbers.
cid_json = st.fixed_dictionaries({
    "stream": st.sampled_from(["fuzz", "", "x" * 65, "\x00", "\U0001F600" * 64]) | st.text(max_size=8),
    "frame": st.sampled_from([0, 1, -1, 2**53 - 1, 2**53, 2**63, 2**70, 10**400]) | st.integers(0, 3),
    "face": st.integers(-1, 3),
})
# Arrays of ids: empty, repeated (faces drawn from a small range), up to 17 long, or not an array at all.
ids_json = st.lists(cid_json, max_size=p.MAX_CROPS + 1) | cid_json | json_values
faces_json = st.lists(
    st.fixed_dictionaries({
        "id": cid_json,
        "label": st.sampled_from(["a", "b", "c", ""]),
        "probabilities": st.dictionaries(st.sampled_from(["a", "b", "c"]),
                                         st.floats(-1, 2, allow_nan=False) | st.integers(-1, 2), max_size=3),
        "inference_ms": st.floats(-1, 1e9, allow_nan=False),
    }),
    max_size=p.MAX_CROPS + 1,
) | json_values
HEADER_FIELDS = {
    "ids": ids_json, "faces": faces_json, "deadline_ms": json_values, "width_px": json_values, "height_px": json_values,
    "job": json_values, "encoding": json_values, "capacity": json_values, "worker": json_values, "model": json_values,
    "label": json_values, "probabilities": json_values, "reason": json_values,
    "id": cid_json, "payload": json_values, "payloads": json_values, "x": json_values,  # not fields of version 2
}


@st.composite
def hostile_header(draw) -> bytes:
    keys = draw(st.lists(st.sampled_from(sorted(HEADER_FIELDS)), max_size=7, unique=True))
    return json.dumps({k: draw(HEADER_FIELDS[k]) for k in keys}).encode()


@st.composite
def crops_job(draw) -> list[bytes]:
    """A JOB with 0, 1, several or 17 payload frames against 0..17 ids, sizes right or wrong."""
    n_ids = draw(st.sampled_from([0, 1, 2, 3, p.MAX_CROPS, p.MAX_CROPS + 1]))
    faces = draw(st.sampled_from(["distinct", "repeated"])) if n_ids > 1 else "distinct"
    ids = [{"stream": "fuzz", "frame": 2, "face": (0 if faces == "repeated" and i == n_ids - 1 else i)}
           for i in range(n_ids)]
    w, h = draw(st.sampled_from([(48, 48), (4, 2), (1, 1)]))
    header = {"ids": ids, "deadline_ms": draw(st.sampled_from([1, 50, 600_000, 0])), "width_px": w, "height_px": h}
    n_frames = draw(st.sampled_from(PAYLOAD_COUNTS + [n_ids]))
    payloads = [bytes(w * h) for _ in range(n_frames)]
    if payloads and draw(st.booleans()):  # one crop of the wrong size, anywhere among them
        i = draw(st.integers(0, n_frames - 1))
        payloads[i] = draw(st.binary(max_size=w * h + 2).filter(lambda b: len(b) != w * h))
    return [p.PROTOCOL_TAG, b"JOB", json.dumps(header).encode(), *payloads]


@st.composite
def hostile(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["random", "mutate", "header", "sizes", "crops", "tag", "legacy"]))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), max_size=7))
    if kind == "crops":
        return draw(crops_job())
    if kind == "legacy":
        return list(draw(st.sampled_from(LEGACY)))
    frames = list(draw(st.sampled_from(VALID)))
    if kind == "mutate":
        op = draw(st.sampled_from(["drop", "dup", "truncate", "flip", "extra"]))
        i = draw(st.integers(0, len(frames) - 1))
        if op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "truncate":
            frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif op == "flip" and frames[i]:
            j = draw(st.integers(0, len(frames[i]) - 1))
            frames[i] = frames[i][:j] + bytes([frames[i][j] ^ draw(st.integers(1, 255))]) + frames[i][j + 1:]
        else:
            frames.append(draw(st.binary(max_size=32)))
    elif kind == "header" and len(frames) > 2:
        frames[2] = draw(st.one_of(
            st.binary(max_size=40),  # non-UTF-8, non-JSON
            json_values.map(lambda v: json.dumps(v).encode()),
            hostile_header(),
        ))
    elif kind == "sizes":
        w = draw(st.sampled_from([0, 1, 47, 48, 4096, 2**31, -1]))
        h = draw(st.sampled_from([0, 1, 48, 4096, 2**40]))
        n = draw(st.sampled_from(PAYLOAD_COUNTS))
        header = {"ids": [{"stream": "s", "frame": 0, "face": i} for i in range(max(n, 1))],
                  "deadline_ms": draw(st.integers(-5, 10**9)), "width_px": w, "height_px": h, "encoding": "gray8"}
        payloads = draw(st.lists(st.binary(max_size=3000 if n <= 1 else 200), min_size=n, max_size=n))
        frames = [p.PROTOCOL_TAG, b"JOB", json.dumps(header).encode(), *payloads]
    else:
        frames[0] = draw(st.sampled_from([b"fer-swarm/1", b"fer-swarm/3", b"fer-swarm/", b"FER-SWARM/2", b"",
                                          b"fer-swarm/3\x00", b"fer-swarm/30", b"fer-swarm/2"]))
    return frames


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def send_job(c: Client, frame: int, crops: list[np.ndarray], deadline_ms: int = 5000) -> tuple[p.CorrelationId, ...]:
    """One JOB carrying ``crops`` (faces 0..n-1 of ``frame``); its ids."""
    ids = tuple(p.CorrelationId(stream=c.stream, frame=frame, face=i) for i in range(len(crops)))
    h, w = crops[0].shape
    c.send(p.Job(ids=ids, deadline_ms=deadline_ms, width_px=w, height_px=h,
                 payloads=tuple(crop.tobytes() for crop in crops)))
    return ids


@pytest.fixture(scope="module")
def live():
    """A broker process, a worker process on its own test-driven ROUTER, and the sockets to hit them."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = subprocess.Popen(
        [sys.executable, "-m", "fer_swarm", "-q", "broker", "--frontend", front, "--backend", back,
         "--heartbeat-interval-s", "0.2", "--max-clients", "64"],
        stderr=subprocess.PIPE,
    )
    ctx = zmq.Context()
    as_broker = ctx.socket(zmq.ROUTER)  # the worker under fuzz connects here
    as_broker.linger = 0
    worker_end = f"tcp://127.0.0.1:{as_broker.bind_to_random_port('tcp://127.0.0.1')}"
    worker = WorkerProcess(worker_end, "--reconnect-max-s", "1")
    as_client = ctx.socket(zmq.DEALER)
    as_worker = ctx.socket(zmq.DEALER)
    for s in (as_client, as_worker):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 100_000
    as_client.connect(front)
    as_worker.connect(back)
    assert as_broker.poll(30_000), "worker never registered"
    worker_id, ready = p.decode_routed(as_broker.recv_multipart())
    assert isinstance(ready, p.Ready)
    time.sleep(0.3)
    state = dict(ctx=ctx, broker=broker, worker=worker, front=front, back=back, as_client=as_client,
                 as_worker=as_worker, as_broker=as_broker, worker_id=worker_id, sent=0,
                 job_payload_frames=collections.Counter(), rss_before=rss_kb(broker.pid))
    yield state
    for s in (as_client, as_worker, as_broker):
        s.close(0)
    worker.stop()
    broker.terminate()
    broker.wait(10)
    ctx.term()


def _drain(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(hostile(), min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE))
def test_fuzz_does_not_kill_broker_or_worker(live, batch):
    for frames in batch:
        if not frames:
            continue
        live["as_client"].send_multipart(frames, zmq.NOBLOCK)
        live["as_worker"].send_multipart(frames, zmq.NOBLOCK)
        live["as_broker"].send_multipart([live["worker_id"], *frames], zmq.NOBLOCK)
        live["sent"] += 1
        if frames[:2] == [p.PROTOCOL_TAG, b"JOB"]:
            live["job_payload_frames"][len(frames) - 3] += 1
    for s in ("as_client", "as_worker", "as_broker"):
        _drain(live[s])
    assert live["broker"].poll() is None, live["broker"].stderr.read().decode()[-2000:]
    assert live["worker"].proc.poll() is None, live["worker"].proc.stderr.read().decode()[-2000:]


def test_after_fuzz_well_formed_jobs_are_answered_and_memory_is_bounded(live):
    assert live["sent"] >= 10_000, live["sent"]
    # The fuzz really sent JOBs with no payload frame, one, several, the most allowed, and one too many.
    counts = live["job_payload_frames"]
    assert all(counts[n] >= 20 for n in PAYLOAD_COUNTS), dict(counts)
    time.sleep(0.5)
    # The fuzzed worker still answers a proper job from its (test) broker.
    # The fuzz included valid DISCONNECTs, and this stand-in broker answers no heartbeats, so the
    # worker rightly keeps re-registering under new identities: answer its next READY at once.
    as_broker, wid = live["as_broker"], None
    _drain(as_broker)
    end = time.monotonic() + 10
    while wid is None and time.monotonic() < end and as_broker.poll(2000):
        frames = as_broker.recv_multipart()
        if frames[2:3] == [b"READY"]:
            wid = frames[0]
    assert wid is not None, "the fuzzed worker stopped registering"
    faces = real_faces(3)
    good = p.Job(ids=(CID, CID2, CID3), job=424242, deadline_ms=5000, width_px=48, height_px=48,
                 payloads=tuple(f.tobytes() for f in faces))
    as_broker.send_multipart(p.encode_routed(wid, good))
    end, answer = time.monotonic() + 10, None
    while answer is None and time.monotonic() < end and as_broker.poll(1000):
        _, msg = p.decode_routed(as_broker.recv_multipart())
        if isinstance(msg, (p.Result, p.Error, p.Expired, p.Busy)) and msg.job == 424242:
            answer = msg
    assert isinstance(answer, p.Result), answer
    assert answer.ids == (CID, CID2, CID3)
    # The fuzzed broker still serves a real worker and a fresh client, with single- and multi-crop JOBs.
    real = WorkerProcess(live["back"], "--name", "after-fuzz")
    c = Client(live["ctx"], live["front"])
    try:
        c.welcome(timeout_s=30)
        crops = real_faces(20)
        sent = [send_job(c, i, crops[2 * i: 2 * i + 1 + i % 2]) for i in range(10)]  # 1 or 2 crops each
        replies = c.collect(10, timeout_s=15)
        assert all(isinstance(r, p.Result) for r in replies), replies
        assert len(replies) == 10 and {r.ids for r in replies} == set(sent)
    finally:
        c.close()
        real.stop()
    rss_after = rss_kb(live["broker"].pid)
    print(f"\nbroker RSS before fuzz {live['rss_before']} KB, after {live['sent']} hostile messages x3 {rss_after} KB")
    assert rss_after < live["rss_before"] + 30_000, (live["rss_before"], rss_after)


def test_oversized_message_disconnects_only_its_sender(live):
    c_ok = Client(live["ctx"], live["front"], stream="ok")
    big = live["ctx"].socket(zmq.DEALER)
    big.linger = 0
    big.connect(live["front"])
    real = WorkerProcess(live["back"], "--name", "big-test")
    try:
        c_ok.welcome(timeout_s=30)
        monitor = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # Over the broker's 64 KiB MAXMSGSIZE: a malformed JOB that would earn an ERROR if it were read.
        big.send_multipart([p.PROTOCOL_TAG, b"JOB", b"{}", bytes(200_000)])
        assert monitor.poll(3000), "the oversized sender was not disconnected"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        assert not big.poll(500), "the oversized message was read and answered"
        blank = np.zeros((48, 48), np.uint8)
        sent = [send_job(c_ok, i, [blank] * (1 + i % 3)) for i in range(5)]
        replies = c_ok.collect(5, timeout_s=10)
        assert {r.ids for r in replies} == set(sent) and all(isinstance(r, p.Result) for r in replies)
        big.disable_monitor()
        monitor.close(0)
    finally:
        big.close(0)
        c_ok.close()
        real.stop()


def test_flood_of_new_client_identities_keeps_tables_bounded():
    with zmq_context() as ctx:
        b = BrokerThread(ctx, max_clients=64)
        socks, sent_ids = [], []
        try:
            for i in range(300):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.identity = f"flood-{i}".encode()
                s.connect(b.frontend)
                # No worker: each job waits in the queue, so each of these clients holds state.
                ids = tuple(p.CorrelationId(stream=f"f{i}", frame=0, face=k) for k in range(1 + i % 3))
                s.send_multipart(p.encode(p.Job(ids=ids, deadline_ms=1500, width_px=48, height_px=48,
                                                payloads=(bytes(2304),) * len(ids))))
                socks.append(s)
                sent_ids.append(ids)
                assert len(b.scheduler.clients) <= 64
            replies = [p.decode(s.recv_multipart()) if s.poll(5000) else None for s in socks]
            kinds = [type(r).__name__ for r in replies]
            assert kinds.count("Busy") == 300 - 64 and kinds.count("Expired") == 64, kinds
            # Each client's one terminal reply names all the crops of its JOB.
            assert [r.ids if r is not None else None for r in replies] == sent_ids
            assert len(b.scheduler.clients) <= 64
        finally:
            for s in socks:
                s.close(0)
            b.stop()
