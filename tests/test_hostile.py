"""Hostile input against a live broker process and a live worker process.

Property-based: hypothesis generates random and mutated multipart messages
(wrong frame counts, other versions, truncated headers, huge declared sizes,
non-UTF-8, wrong pixel counts, out-of-range fields) and the test sends every
one to the broker as a client, to the broker as a worker, and to a worker as
its broker. Neither process may die, a well-formed job afterwards must still
be answered, and the broker's memory must stay bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

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
MODEL = p.ModelInfo(name="m", version="1", input_shape=(1, 48, 48, 1), labels=("a", "b"), width_px=48, height_px=48)
VALID = [
    p.encode(p.Job(id=CID, deadline_ms=50, width_px=48, height_px=48, payload=bytes(2304))),
    p.encode(p.Hello(client="fuzz")),
    p.encode(p.Heartbeat()),
    p.encode(p.Ready(worker="fuzz", capacity=2, model=MODEL)),
    p.encode(p.Result(id=CID, job=1, label="a", probabilities={"a": 0.6, "b": 0.4}, model="m:1", worker="w", inference_ms=1.0)),
    p.encode(p.Disconnect(reason="fuzz")),
    p.encode(p.Error(id=CID, job=1, reason="fuzz")),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["random", "mutate", "header", "sizes", "tag"]))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), max_size=7))
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
            st.dictionaries(st.sampled_from(["id", "deadline_ms", "width_px", "height_px", "job", "encoding", "capacity",
                                             "worker", "model", "label", "probabilities", "x"]),
                            json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
        ))
    elif kind == "sizes":
        w = draw(st.sampled_from([0, 1, 47, 48, 4096, 2**31, -1]))
        h = draw(st.sampled_from([0, 1, 48, 4096, 2**40]))
        header = {"id": {"stream": "s", "frame": 0, "face": 0}, "deadline_ms": draw(st.integers(-5, 10**9)),
                  "width_px": w, "height_px": h, "encoding": "gray8"}
        frames = [p.PROTOCOL_TAG, b"JOB", json.dumps(header).encode(), draw(st.binary(max_size=3000))]
    else:
        frames[0] = draw(st.sampled_from([b"fer-swarm/2", b"fer-swarm/", b"FER-SWARM/1", b"", b"fer-swarm/1\x00"]))
    return frames


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


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
                 rss_before=rss_kb(broker.pid))
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
    for s in ("as_client", "as_worker", "as_broker"):
        _drain(live[s])
    assert live["broker"].poll() is None, live["broker"].stderr.read().decode()[-2000:]
    assert live["worker"].proc.poll() is None, live["worker"].proc.stderr.read().decode()[-2000:]


def test_after_fuzz_well_formed_jobs_are_answered_and_memory_is_bounded(live):
    assert live["sent"] >= 10_000, live["sent"]
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
    good = p.Job(id=CID, job=424242, deadline_ms=5000, width_px=48, height_px=48, payload=real_faces(1)[0].tobytes())
    as_broker.send_multipart(p.encode_routed(wid, good))
    end, answer = time.monotonic() + 10, None
    while answer is None and time.monotonic() < end and as_broker.poll(1000):
        _, msg = p.decode_routed(as_broker.recv_multipart())
        if isinstance(msg, p.Result) and msg.job == 424242:
            answer = msg
    assert answer is not None and answer.id == CID
    # The fuzzed broker still serves a real worker and a fresh client.
    real = WorkerProcess(live["back"], "--name", "after-fuzz")
    c = Client(live["ctx"], live["front"])
    try:
        c.welcome(timeout_s=30)
        sent = [c.job(i, crop=crop) for i, crop in enumerate(real_faces(10))]
        replies = c.collect(10, timeout_s=15)
        assert sorted(r.id.frame for r in replies) == [s.frame for s in sent]
        assert all(isinstance(r, p.Result) for r in replies)
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
        sent = [c_ok.job(i) for i in range(5)]
        replies = c_ok.collect(5, timeout_s=10)
        assert {r.id for r in replies} == set(sent) and all(isinstance(r, p.Result) for r in replies)
        big.disable_monitor()
        monitor.close(0)
    finally:
        big.close(0)
        c_ok.close()
        real.stop()


def test_flood_of_new_client_identities_keeps_tables_bounded():
    with zmq_context() as ctx:
        b = BrokerThread(ctx, max_clients=64)
        socks = []
        try:
            for i in range(300):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.identity = f"flood-{i}".encode()
                s.connect(b.frontend)
                # No worker: each job waits in the queue, so each of these clients holds state.
                s.send_multipart(p.encode(p.Job(id=p.CorrelationId(stream=f"f{i}", frame=0, face=0), deadline_ms=1500,
                                                width_px=48, height_px=48, payload=bytes(2304))))
                socks.append(s)
                assert len(b.scheduler.clients) <= 64
            replies = [p.decode(s.recv_multipart()) if s.poll(5000) else None for s in socks]
            kinds = [type(r).__name__ for r in replies]
            assert kinds.count("Busy") == 300 - 64 and kinds.count("Expired") == 64, kinds
            assert len(b.scheduler.clients) <= 64
        finally:
            for s in socks:
                s.close(0)
            b.stop()
