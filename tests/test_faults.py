"""Fault injection on real processes: the reply invariant and bounded memory under what users' networks do.

The broker runs as ``python -m fer_swarm broker`` and the workers as ``fer-swarm
worker`` processes with the real model; links are stalled or cut with the
project's own relay (:mod:`fer_swarm.bench.relay`), processes are killed and
frozen with real signals. Each test keeps the fate of every job it sent and
asserts the invariant of docs/protocol.md: each got exactly one terminal reply
(RESULT, EXPIRED, BUSY or ERROR) naming exactly its ids, or one of the outcomes
the protocol leaves to the client:

- *unsent*: the send failed at once (the client sets ``ZMQ_IMMEDIATE``, so a
  job is never queued for a broker it is not connected to);
- *lost*: sent, unanswered, and then the client's connection dropped; the
  client must time such jobs out (no broker that is gone can answer them);
- *forgotten*: a client that does not read its replies is declared gone by the
  broker, which then drops its replies (only in the never-reading test).

No reply may come twice, and none may come for a job already lost. The
broker's memory (VmRSS and its peak VmHWM, from /proc) must stay within
:func:`memory_bound_kb`, derived from the documented limits.

No assertion is about speed: deadlines are generous (seconds) wherever a job
must be answered, every wait is a bounded poll, every load loop is bounded in
count and in time. The slow measurements (goodput on slow links, floods for
15 s, a soak) are in ``bench/faults.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import zmq

from fer_swarm import protocol as p
from fer_swarm.bench.relay import Relay
from fer_swarm.broker.server import CLIENT_RCVHWM, CLIENT_SNDHWM
from fer_swarm.config import BrokerSettings, StatusSettings
from fer_swarm.status import StatusClient

from .swarm import free_port, real_faces, wait_for, zmq_context

HEARTBEAT_S = 0.25  # broker and workers; a silent peer is dropped after LIVENESS of these
LIVENESS = 4
REPLIES = (p.Result, p.Expired, p.Busy, p.Error)
FACES = real_faces(16)

# ------------------------------------------------------------------ memory bound

DEFAULTS = BrokerSettings()
# What a bounded broker still keeps beyond the bytes the limits count: Python objects for each queued
# job (a pydantic JOB and its ids: measured ~10 KB for 16 ids, 16 KB allowed) and what the allocator
# keeps after a burst (arenas, fragmentation, libzmq's buffers): 32 MB, against the hundreds of MB an
# unbounded connection reached in seconds (issue 13: 44 -> 920 MB in 14 s with one flooding client).
PER_JOB_OBJECTS_BYTES = 16 << 10
ALLOCATOR_SLACK_BYTES = 32 << 20


def memory_bound_kb(baseline_kb: int, job_bytes: int, clients: int) -> int:
    """The most the broker's RSS may reach with ``clients`` connections each sending JOBs of ``job_bytes``.

    From the limits the broker documents (``broker/server.py``, ``BrokerSettings``):
    per client connection, libzmq holds at most ``CLIENT_RCVHWM`` JOBs it has read and not yet handed
    over, and at most ``CLIENT_SNDHWM`` replies the client has not read (each at most a header of
    ``MAX_HEADER_BYTES`` plus the tag and command); the scheduler holds at most
    ``min(max_client_bytes, max_queue_bytes)`` bytes of pixels per client and ``max_queue_bytes`` in
    all, in at most ``max_queue`` jobs. Plus :data:`ALLOCATOR_SLACK_BYTES`.
    """
    d = DEFAULTS
    per_connection = CLIENT_RCVHWM * job_bytes + CLIENT_SNDHWM * (p.MAX_HEADER_BYTES + 64)
    queued = min(d.max_queue_bytes, clients * min(d.max_client_bytes, d.max_queue_bytes))
    objects = min(d.max_queue, clients * d.max_queue_per_client) * PER_JOB_OBJECTS_BYTES
    return baseline_kb + (clients * per_connection + queued + objects + ALLOCATOR_SLACK_BYTES) // 1024


def proc_status_kb(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field_name} for process {pid}")


# ------------------------------------------------------------------ processes


class Proc:
    """A fer-swarm program as a process, its stderr kept in a file (a pipe nobody reads could fill up)."""

    def __init__(self, *args: str):
        self.args = args
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "fer_swarm", *args], stdout=subprocess.DEVNULL,
                                     stderr=self.log, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]


class BrokerProc(Proc):
    def __init__(self, front_port: int, back_port: int, *args: str):
        super().__init__("broker", "--frontend", f"tcp://127.0.0.1:{front_port}", "--backend",
                         f"tcp://127.0.0.1:{back_port}", "--heartbeat-interval-s", str(HEARTBEAT_S),
                         "--liveness", str(LIVENESS), *args)
        self.front, self.back = f"tcp://127.0.0.1:{front_port}", f"tcp://127.0.0.1:{back_port}"
        self.back_port = back_port
        end = time.monotonic() + 30
        while not _listening(back_port) or not _listening(front_port):
            assert self.alive(), f"broker exited: {self.stderr()}"
            assert time.monotonic() < end, "broker did not bind within 30 s"
            time.sleep(0.05)

    def status(self) -> dict:
        with StatusClient(StatusSettings(broker=self.front, timeout_s=10)) as c:
            return c.fetch()

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def peak_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def worker(backend: str, name: str, *args: str) -> Proc:
    return Proc("-q", "worker", "--broker", backend, "--name", name, "--threads", "1",
                "--heartbeat-interval-s", str(HEARTBEAT_S), "--liveness", str(LIVENESS),
                "--reconnect-initial-s", "0.1", "--reconnect-max-s", "1", *args)


def worker_names(broker: BrokerProc) -> list[str]:
    return sorted(w["name"] for w in broker.status()["workers"])


def wait_workers(broker: BrokerProc, names: list[str], timeout_s: float = 60) -> None:
    ok = wait_for(lambda: worker_names(broker) == sorted(names), timeout_s, 0.2)
    assert ok, f"workers {worker_names(broker)} instead of {sorted(names)}"


# ------------------------------------------------------------------ a client that keeps every job's fate


@dataclass
class Sent:
    ids: tuple[p.CorrelationId, ...]
    at: float  # monotonic, when send() returned
    deadline_ms: int
    replies: list[tuple[p.Message, float]] = field(default_factory=list)
    fate: str = ""  # "unsent" or "lost" when no reply is owed


class Tracked:
    """A DEALER client as docs/protocol.md asks one to be: ``ZMQ_IMMEDIATE`` (no job queued for a broker it is
    not connected to), jobs in flight when its connection drops counted lost. Keeps every job's fate."""

    def __init__(self, ctx: zmq.Context, endpoint: str, stream: str, *, rcvhwm: int = 1000, rcvbuf: int = -1):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.rcvhwm = rcvhwm
        self.sock.setsockopt(zmq.RCVBUF, rcvbuf)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.stream = stream
        self.jobs: dict[int, Sent] = {}
        self.strays: list[p.Message] = []  # replies naming no job of ours, or not exactly its ids
        self.after_lost: list[int] = []  # frames answered after we had counted them lost
        self.disconnects = 0
        self._frame = 0

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)

    def hello(self, timeout_s: float = 60) -> p.Welcome:
        """HELLO until the broker announces a model (a worker is registered)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                self.sock.send_multipart(p.encode(p.Hello(client=self.stream)), zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.1)
                continue
            poll_end = time.monotonic() + 0.3
            while (left := poll_end - time.monotonic()) > 0 and self.sock.poll(left * 1000):
                msg = self._read()
                if isinstance(msg, p.Welcome) and msg.model is not None:
                    return msg
        raise AssertionError("the broker announced no model in time")

    def send(self, faces: int = 2, deadline_ms: int = 10_000) -> bool:
        """One JOB of ``faces`` real crops, without blocking; False (fate "unsent") when it cannot go now."""
        self._frame += 1
        ids = tuple(p.CorrelationId(stream=self.stream, frame=self._frame, face=i) for i in range(faces))
        job = p.Job(ids=ids, deadline_ms=deadline_ms, width_px=48, height_px=48,
                    payloads=tuple(FACES[(self._frame + i) % len(FACES)].tobytes() for i in range(faces)))
        sent = Sent(ids, 0.0, deadline_ms)
        self.jobs[self._frame] = sent
        try:
            self.sock.send_multipart(p.encode(job), zmq.NOBLOCK)
        except zmq.Again:
            sent.fate = "unsent"
            return False
        sent.at = time.monotonic()
        return True

    def pump(self, timeout_s: float = 0.0) -> int:
        """Read what has arrived (waiting up to ``timeout_s`` for the first); notice a dropped connection."""
        got = 0
        if self.sock.poll(timeout_s * 1000):
            while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._read()
                got += 1
        if self.monitor.poll(0):
            while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self.monitor.recv_multipart()
                self.disconnects += 1
            while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # what arrived before the drop is still ours
                self._read()
            for sent in self.pending():
                sent.fate = "lost"
        return got

    def _read(self) -> p.Message:
        msg = p.decode(self.sock.recv_multipart(zmq.NOBLOCK))
        if isinstance(msg, REPLIES):
            named = msg.ids if not isinstance(msg, p.Result) else tuple(f.id for f in msg.faces)
            frame = named[0].frame if named else None
            sent = self.jobs.get(frame)
            if sent is None or {i.key() for i in named} != {i.key() for i in sent.ids} or len(named) != len(sent.ids):
                self.strays.append(msg)
            else:
                if sent.fate == "lost":
                    self.after_lost.append(frame)
                sent.replies.append((msg, time.monotonic()))
        return msg

    def pending(self) -> list[Sent]:
        return [s for s in self.jobs.values() if not s.fate and not s.replies]

    def settle(self, timeout_s: float = 30) -> None:
        """Read until no reply is owed (bounded)."""
        end = time.monotonic() + timeout_s
        while self.pending() and (left := end - time.monotonic()) > 0:
            self.pump(min(left, 0.2))
        self.pump(0.2)  # and a moment more, for a duplicate that would follow

    def fates(self) -> Counter:
        """How the jobs ended: reply type names, "unsent", "lost"; "none" for a reply still owed."""
        out = Counter()
        for s in self.jobs.values():
            out[s.fate or (type(s.replies[0][0]).__name__ if s.replies else "none")] += 1
        return out

    def assert_invariant(self, *, owed_may_be_missing: bool = False) -> Counter:
        """Every job got exactly one terminal reply naming exactly its ids, or no reply and a client-side fate."""
        assert not self.strays, f"replies naming no job of ours or not its ids: {self.strays[:3]}"
        assert not self.after_lost, f"jobs answered after their connection dropped: {self.after_lost[:10]}"
        twice = {f: [type(m).__name__ for m, _ in s.replies] for f, s in self.jobs.items() if len(s.replies) > 1}
        assert not twice, f"jobs answered more than once: {dict(list(twice.items())[:5])}"
        fates = self.fates()
        if not owed_may_be_missing:
            assert fates["none"] == 0, f"jobs with no reply and no client-side reason: {fates}"
        return fates

    def results(self) -> list[p.Result]:
        return [m for s in self.jobs.values() for m, _ in s.replies if isinstance(m, p.Result)]


@pytest.fixture
def ctx():
    with zmq_context() as c:
        yield c


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def _start(procs: list[Proc], proc: Proc) -> Proc:
    procs.append(proc)
    return proc


def _baseline(broker: BrokerProc, client: Tracked) -> int:
    """The broker's RSS once it has served a few jobs (its lazy imports and first buffers done)."""
    for _ in range(5):
        client.send(2, 10_000)
    client.settle(30)
    return broker.rss_kb()


JOB2_BYTES = 2 * 48 * 48 + 1024  # two 48x48 crops and a header
JOB16_BYTES = 16 * 48 * 48 + 2048


def _paced(client: Tracked, n: int, every_s: float, **kw) -> None:
    """Send ``n`` jobs ``every_s`` apart, reading replies meanwhile."""
    for _ in range(n):
        client.send(**kw)
        client.pump(every_s)


def _until_held(client: Tracked, broker: BrokerProc, name: str) -> None:
    """Send bursts of jobs until worker ``name`` holds one (the broker fills the least loaded worker first,
    so a slow worker gets jobs only once the others' credits are in use); bounded in bursts and time."""
    end = time.monotonic() + 30
    for _ in range(60):
        _paced(client, 4, 0.0)
        for w in broker.status()["workers"]:
            if w["name"] == name and w["in_flight"] > 0:
                return
        assert time.monotonic() < end, f"worker {name} never held a job"
    raise AssertionError(f"worker {name} never held a job")


# ------------------------------------------------------------------ the faults


def test_worker_killed_with_jobs_in_flight(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    # The doomed worker pads each face to 150 ms so that it surely holds jobs when it dies.
    doomed = _start(procs, worker(broker.back, "doomed", "--service-time-ms", "150"))
    _start(procs, worker(broker.back, "spare"))
    wait_workers(broker, ["doomed", "spare"])
    client = Tracked(ctx, broker.front, "kill9")
    try:
        client.hello()
        base = _baseline(broker, client)
        _until_held(client, broker, "doomed")
        doomed.kill()
        _paced(client, 20, 0.02)
        client.settle(60)
        fates = client.assert_invariant()
        status = broker.status()
    finally:
        client.close()
    # Deadlines of 10 s leave time to send the dead worker's jobs again: every job gets its RESULT.
    assert fates == Counter(Result=len(client.jobs)), fates
    assert status["counters"]["workers_lost"] == 1 and status["counters"]["redispatched"] >= 1, status["counters"]
    assert {r.worker for r in client.results()} <= {"doomed", "spare"}
    assert broker.peak_kb() <= memory_bound_kb(base, JOB2_BYTES, 1)


def test_worker_frozen_then_thawed(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    frozen = _start(procs, worker(broker.back, "frozen", "--service-time-ms", "100"))
    _start(procs, worker(broker.back, "steady"))
    wait_workers(broker, ["frozen", "steady"])
    client = Tracked(ctx, broker.front, "sigstop")
    try:
        client.hello()
        base = _baseline(broker, client)
        _until_held(client, broker, "frozen")
        frozen.signal(signal.SIGSTOP)
        # Silent for longer than the broker's liveness (1 s): it is dropped and its jobs go to the other.
        assert wait_for(lambda: worker_names(broker) == ["steady"], 30, 0.1), worker_names(broker)
        _paced(client, 20, 0.05)
        frozen.signal(signal.SIGCONT)
        # Thawed, it registers again, once: no ghost of its old connection stays.
        wait_workers(broker, ["frozen", "steady"])
        _paced(client, 20, 0.02)
        client.settle(60)
        fates = client.assert_invariant()
        status = broker.status()
    finally:
        client.close()
    assert fates == Counter(Result=len(client.jobs)), fates
    assert status["counters"]["workers_lost"] >= 1 and status["counters"]["redispatched"] >= 1, status["counters"]
    assert frozen.alive()
    assert broker.peak_kb() <= memory_bound_kb(base, JOB2_BYTES, 1)


def test_broker_restart_on_the_same_ports(ctx, procs):
    front, back = free_port(), free_port()
    broker = _start(procs, BrokerProc(front, back))
    _start(procs, worker(broker.back, "survivor", "--service-time-ms", "20"))
    wait_workers(broker, ["survivor"])
    client = Tracked(ctx, broker.front, "restart")
    deadline_ms = 1500
    try:
        client.hello()
        _paced(client, 10, 0.02, deadline_ms=deadline_ms)
        client.settle(30)
        for _ in range(30):  # a burst, so that jobs are queued and in flight when the broker dies
            client.send(2, deadline_ms)
        broker.kill()
        end = time.monotonic() + 10
        while client.disconnects == 0 and time.monotonic() < end:
            client.pump(0.05)
        assert client.disconnects > 0, "the client did not notice its connection drop"
        lost_at_crash = client.fates()["lost"]
        # The broker is down for 3 s, twice the deadline: a job queued meanwhile would be stale on arrival.
        down_until = time.monotonic() + 3
        while time.monotonic() < down_until:
            client.send(2, deadline_ms)
            client.pump(0.1)
        restarted_at = time.monotonic()
        broker = _start(procs, BrokerProc(front, back))
        client.hello()  # the worker is back (a model is announced) and the client reconnected
        _paced(client, 30, 0.03, deadline_ms=deadline_ms)
        client.settle(30)
        fates = client.assert_invariant()
        status = broker.status()
    finally:
        client.close()
    print(f"\nbroker restart: {dict(fates)}; lost with the dead broker: {lost_at_crash}")
    assert lost_at_crash > 0  # the burst was still at the broker when it died; no reply can come for it
    assert fates["unsent"] > 0  # sends while it was down failed at once instead of queueing
    # After the restart no job was answered later than its deadline allowed, counted from when the client
    # sent it (1 s of slack for a loaded machine's scheduling; a job queued while the broker was down would
    # have arrived 3 s late).
    late = [(f, round(t - s.at, 3)) for f, s in client.jobs.items() for m, t in s.replies
            if isinstance(m, p.Result) and t - s.at > deadline_ms / 1000 + 1.0]
    assert not late, late
    # The new broker saw only jobs sent to it: none queued while it was down reached it later.
    sent_to_new = sum(1 for s in client.jobs.values() if s.at >= restarted_at)
    assert status["counters"]["received"] == sent_to_new, (status["counters"], sent_to_new)


def test_link_stall_then_resume(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    relay = Relay(0, ("127.0.0.1", broker.back_port), 0.0)
    relay.start()
    try:
        _start(procs, worker(f"tcp://127.0.0.1:{relay.port}", "far", "--service-time-ms", "100"))
        _start(procs, worker(broker.back, "near"))
        wait_workers(broker, ["far", "near"])
        client = Tracked(ctx, broker.front, "stall")
        try:
            client.hello()
            base = _baseline(broker, client)
            _until_held(client, broker, "far")
            relay.stall()
            assert wait_for(lambda: worker_names(broker) == ["near"], 30, 0.1), worker_names(broker)
            _paced(client, 20, 0.05)
            relay.resume()
            # Its link back, the far worker registers again, once: the broker keeps no ghost of the old connection.
            wait_workers(broker, ["far", "near"])
            _paced(client, 20, 0.02)
            client.settle(60)
            fates = client.assert_invariant()
            status = broker.status()
        finally:
            client.close()
    finally:
        relay.stop()
    assert fates == Counter(Result=len(client.jobs)), fates
    assert status["counters"]["workers_lost"] >= 1 and status["counters"]["redispatched"] >= 1, status["counters"]
    assert broker.peak_kb() <= memory_bound_kb(base, JOB2_BYTES, 1)


def test_link_cut_mid_stream(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    relay = Relay(0, ("127.0.0.1", broker.back_port), 0.0)
    relay.start()
    try:
        _start(procs, worker(f"tcp://127.0.0.1:{relay.port}", "far", "--service-time-ms", "100"))
        _start(procs, worker(broker.back, "near"))
        wait_workers(broker, ["far", "near"])
        client = Tracked(ctx, broker.front, "cut")
        try:
            client.hello()
            _until_held(client, broker, "far")
            relay.cut()  # a reset: the broker hears of it at once (socket monitor), not at a heartbeat
            _paced(client, 20, 0.05)
            wait_workers(broker, ["far", "near"])
            _paced(client, 10, 0.02)
            client.settle(60)
            fates = client.assert_invariant()
            status = broker.status()
        finally:
            client.close()
    finally:
        relay.stop()
    assert fates == Counter(Result=len(client.jobs)), fates
    assert status["counters"]["workers_lost"] >= 1 and status["counters"]["redispatched"] >= 1, status["counters"]


def test_flood_from_one_client_beside_a_polite_one(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    _start(procs, worker(broker.back, "w1"))
    _start(procs, worker(broker.back, "w2"))
    wait_workers(broker, ["w1", "w2"])
    flood = Tracked(ctx, broker.front, "flood")
    polite = Tracked(ctx, broker.front, "polite")
    try:
        flood.hello()
        polite.hello()
        base = _baseline(broker, polite)
        # As fast as it can (reading its replies as they come), at most 3000 JOBs of 16 faces or 4 s;
        # the polite client sends one 2-face JOB every 0.1 s meanwhile.
        end, next_polite = time.monotonic() + 4, 0.0
        while len(flood.jobs) < 3000 and time.monotonic() < end:
            flood.send(16, 3000)  # 3 s: what the workers cannot reach expires, so the test ends sooner
            flood.pump()
            if time.monotonic() >= next_polite:
                next_polite = time.monotonic() + 0.1
                polite.send(2, 10_000)
                polite.pump()
        flood.settle(60)
        polite.settle(60)
        flood_fates = flood.assert_invariant()
        polite_fates = polite.assert_invariant()
    finally:
        flood.close()
        polite.close()
    peak = broker.peak_kb()
    print(f"\nflood: {dict(flood_fates)}; polite: {dict(polite_fates)}; broker RSS {base} KB -> peak {peak} KB")
    assert flood_fates["Busy"] > 0  # the flood did outrun the workers and the client's share of the queue
    # The polite client holds far less than its fair share of the queue: none of its jobs is pushed out
    # (BUSY), and with 10 s deadlines each gets its RESULT.
    assert polite_fates == Counter(Result=len(polite.jobs)), polite_fates
    assert peak <= memory_bound_kb(base, JOB16_BYTES, 2), (base, peak)


def test_client_that_never_reads_its_replies(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    _start(procs, worker(broker.back, "w1"))
    _start(procs, worker(broker.back, "w2"))
    wait_workers(broker, ["w1", "w2"])
    polite = Tracked(ctx, broker.front, "polite")
    # Small buffers on its side, so that the broker's own bound is what the replies run into.
    deaf = Tracked(ctx, broker.front, "deaf", rcvhwm=1, rcvbuf=4096)
    try:
        polite.hello()
        deaf.hello()
        deaf.pump(0.5)  # the WELCOMEs of repeated HELLOs: from here on it reads nothing
        base = _baseline(broker, polite)
        end, next_polite, sent = time.monotonic() + 5, 0.0, 0
        while sent < 4000 and time.monotonic() < end:
            if deaf.send(16, 10_000):
                sent += 1
            else:
                time.sleep(0.001)  # its own send queue is full: libzmq pushes back
            if time.monotonic() >= next_polite:
                next_polite = time.monotonic() + 0.1
                polite.send(2, 10_000)
                polite.pump()
        polite.settle(60)
        polite_fates = polite.assert_invariant()
        deaf.pump(0.5)  # now it reads: what the broker still had for it, each reply once
        deaf_fates = deaf.assert_invariant(owed_may_be_missing=True)
    finally:
        deaf.close()
        polite.close()
    time.sleep(1)  # the broker notices the deaf client leave
    status, after, peak = broker.status(), broker.rss_kb(), broker.peak_kb()
    print(f"\nnever-reading client: {dict(deaf_fates)} of {len(deaf.jobs)} (no reply: it was declared gone); "
          f"polite: {dict(polite_fates)}; broker RSS {base} KB -> peak {peak} KB, after {after} KB; "
          f"{len(status['clients'])} client(s) known")
    assert deaf_fates["none"] > 0  # the broker did stop keeping its replies: they are the outcome it documents
    assert polite_fates == Counter(Result=len(polite.jobs)), polite_fates
    assert after <= peak <= memory_bound_kb(base, JOB16_BYTES, 2), (base, peak, after)


def test_a_small_job_is_not_judged_by_the_size_of_big_ones(ctx, procs):
    # One worker taking at least 100 ms a face. A 16-face job (1.6 s) teaches the broker its service time;
    # then, with the worker idle, a one-face job with 1 s to spare needs about 100 ms.
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    _start(procs, worker(broker.back, "slow", "--service-time-ms", "100"))
    wait_workers(broker, ["slow"])
    client = Tracked(ctx, broker.front, "sizes")
    try:
        client.hello()
        client.send(16, 10_000)
        client.settle(30)
        assert wait_for(lambda: broker.status()["workers"][0]["in_flight"] == 0, 10)
        client.send(1, 1000)
        client.settle(30)
        fates = client.assert_invariant()
        last = client.jobs[max(client.jobs)].replies[0][0]
    finally:
        client.close()
    assert fates["Result"] == 2, (fates, last)


class LyingWorker(threading.Thread):
    """A worker that registers with the pool's model, keeps its heartbeats, and answers every job with the
    ids of another job it holds (two jobs' answers swapped; or, holding one, ids of faces it was never
    sent): labels for the wrong faces. Stops at DISCONNECT, or when told."""

    def __init__(self, ctx: zmq.Context, backend: str, model: p.ModelInfo):
        super().__init__(name="lying-worker", daemon=True)
        self.ctx, self.backend, self.model = ctx, backend, model
        self.stopping = threading.Event()
        self.jobs_got = 0
        self.lies = 0
        self.disconnect: p.Disconnect | None = None

    def _answer(self, sock: zmq.Socket, job: p.Job, ids: tuple[p.CorrelationId, ...]) -> None:
        labels = self.model.labels
        sock.send_multipart(p.encode(p.Result(job=job.job, model=self.model.ref, worker="liar", faces=tuple(
            p.FaceResult(id=i, label=labels[0], probabilities={x: 1.0 / len(labels) for x in labels},
                         inference_ms=1.0) for i in ids))))
        self.lies += 1

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.backend)
        sock.send_multipart(p.encode(p.Ready(worker="liar", capacity=4, model=self.model)))
        held: list[tuple[p.Job, float]] = []
        next_beat = 0.0
        try:
            while not self.stopping.is_set() and self.disconnect is None:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S / 2
                    sock.send_multipart(p.encode(p.Heartbeat()))
                while sock.poll(20):
                    msg = p.decode(sock.recv_multipart())
                    if isinstance(msg, p.Job):
                        self.jobs_got += 1
                        held.append((msg, time.monotonic()))
                    elif isinstance(msg, p.Disconnect):
                        self.disconnect = msg
                while len(held) >= 2:
                    (a, _), (b, _) = held.pop(0), held.pop(0)
                    self._answer(sock, a, b.ids)  # job a's number, job b's faces, and the other way round
                    self._answer(sock, b, a.ids)
                if held and time.monotonic() - held[0][1] > 0.2:
                    a, _ = held.pop(0)
                    self._answer(sock, a, tuple(i.model_copy(update={"face": i.face + 100}) for i in a.ids))
        finally:
            sock.close(0)


def test_fake_worker_replying_with_wrong_ids(ctx, procs):
    broker = _start(procs, BrokerProc(free_port(), free_port()))
    _start(procs, worker(broker.back, "honest"))
    wait_workers(broker, ["honest"])
    liar = LyingWorker(ctx, broker.back, _welcome_model(ctx, broker))
    liar.start()
    client = Tracked(ctx, broker.front, "victim")
    try:
        wait_workers(broker, ["honest", "liar"])
        client.hello()
        base = broker.rss_kb()
        for _ in range(8):  # bursts of 5: more than the honest worker's credits, so the liar is given some
            _paced(client, 5, 0.0)
            client.pump(0.2)
        client.settle(60)
        fates = client.assert_invariant()
        status = broker.status()
    finally:
        client.close()
        liar.stopping.set()
        liar.join(10)
    assert liar.jobs_got >= 1 and liar.lies >= 1, "the fake worker was never given a job"
    # Not one of its answers reached the client; the jobs it held were sent again when it was
    # disconnected, and answered by the honest worker.
    assert all(r.worker == "honest" for r in client.results())
    assert fates == Counter(Result=len(client.jobs)), fates
    assert status["counters"]["wrong_replies"] >= 1, status["counters"]
    # At 3 wrong replies the broker told it to go, and forgot it.
    assert liar.disconnect is not None and [w["name"] for w in status["workers"]] == ["honest"], liar.disconnect
    assert broker.peak_kb() <= memory_bound_kb(base, JOB2_BYTES, 1)


def _welcome_model(ctx: zmq.Context, broker: BrokerProc) -> p.ModelInfo:
    """The pool's model as WELCOME announces it (a fake worker must announce the same to join)."""
    c = Tracked(ctx, broker.front, "probe")
    try:
        return c.hello().model
    finally:
        c.close()


def test_relay_stall_holds_bytes_and_resume_delivers_them():
    """The fault tool itself: a stall moves nothing, resume delivers what was held, cut resets."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with Relay(0, srv.getsockname(), 0.0) as relay, socket.create_connection(("127.0.0.1", relay.port)) as c:
            peer, _ = srv.accept()
            with peer:
                peer.settimeout(0.3)
                relay.stall()
                c.sendall(b"held")
                with pytest.raises(socket.timeout):
                    peer.recv(16)
                relay.resume()
                peer.settimeout(10)
                assert peer.recv(16) == b"held"
                relay.cut()
                c.settimeout(10)
                with pytest.raises(ConnectionResetError):
                    c.recv(16) or c.recv(16)
