"""The benchmark's own parts on real sockets on 127.0.0.1: the delaying relay and the prototype baseline.

The relay is checked against plain TCP servers written here with the standard
library (so a relay bug cannot hide behind a matching bug in the test's
server); the prototype server runs the real model on real face crops, and its
wire format is spoken by hand here, not through the module's own encoders.
"""

from __future__ import annotations

import io
import logging
import os
import selectors
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fer_swarm.bench.prototype import MAX_REQUEST_BYTES, PrototypeServer, run_prototype_client
from fer_swarm.bench.relay import Relay
from fer_swarm.errors import ModelError, TransportError
from fer_swarm.model import Classifier

from .swarm import MODEL, real_faces, wait_for

IO_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- plain TCP helpers


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    """Everything until the peer closes (bounded by the socket's timeout)."""
    buf = bytearray()
    while chunk := s.recv(1 << 16):
        buf += chunk
    return bytes(buf)


def round_trip_s(s: socket.socket, payload: bytes) -> float:
    t0 = time.perf_counter()
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload
    return time.perf_counter() - t0


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False  # server_close() joins the handlers: nothing outlives its test


@contextmanager
def tcp_server(handle):
    """A real threaded TCP server on 127.0.0.1 calling ``handle(sock)`` per connection; always shut down."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(IO_TIMEOUT_S)  # a handler never waits longer than a test would
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                handle(self.request)
            except OSError:
                pass  # the peer vanished: expected in the disconnect tests

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(IO_TIMEOUT_S)


def echo(sock: socket.socket) -> None:
    while data := sock.recv(1 << 16):
        sock.sendall(data)


@pytest.fixture
def echo_port():
    with tcp_server(echo) as port:
        yield port


@pytest.fixture
def relay_warnings(caplog):
    """Warnings and errors from the relay or from asyncio under it (unhandled task errors, writes to dead sockets)."""
    caplog.set_level(logging.DEBUG)
    watched = ("asyncio", "fer_swarm")
    return lambda: [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(watched)]


# --------------------------------------------------------------------------- relay


def test_relay_adds_twice_the_one_way_delay_to_a_round_trip(echo_port):
    with Relay(0, ("127.0.0.1", echo_port), 0.010) as relay, connect(relay.port) as s:
        round_trip_s(s, b"warm-up")  # the relay's own connect to the target is not part of the contract
        rtts = [round_trip_s(s, b"x" * 16) for _ in range(10)]
    # Every chunk is held 10 ms each way, so no round trip may be shorter than 20 ms;
    # the median also rules out a delay applied twice (40 ms) even on a loaded machine.
    assert min(rtts) >= 0.020, rtts
    assert statistics.median(rtts) < 0.035, rtts


def test_relay_with_no_delay_is_fast(echo_port):
    with Relay(0, ("127.0.0.1", echo_port), 0.0) as relay, connect(relay.port) as s:
        round_trip_s(s, b"warm-up")
        rtts = [round_trip_s(s, b"x" * 16) for _ in range(10)]
    assert statistics.median(rtts) < 0.005, rtts


def test_relay_never_reorders_bytes_in_either_direction():
    """Both sides send 2000 numbered 8-byte records at once, in bursts cut at random places."""
    n = 2000
    records = b"".join(struct.pack(">Q", i) for i in range(n))
    received_by_target: list[bytes] = []

    def send_in_bursts(sock: socket.socket, seed: int) -> None:
        rng = np.random.default_rng(seed)
        pos = 0
        while pos < len(records):
            step = int(rng.integers(1, 400))  # odd sizes: records are split across chunks
            sock.sendall(records[pos:pos + step])
            pos += step
            if rng.random() < 0.1:
                time.sleep(0.001)  # separate reads, so chunks get distinct due times

    def target(sock: socket.socket) -> None:
        send_in_bursts(sock, seed=1)
        received_by_target.append(recv_exact(sock, len(records)))

    with tcp_server(target) as port, Relay(0, ("127.0.0.1", port), 0.003) as relay, connect(relay.port) as s:
        send_in_bursts(s, seed=2)
        got = recv_exact(s, len(records))
        assert wait_for(lambda: received_by_target, IO_TIMEOUT_S)
    assert got == records
    assert received_by_target[0] == records


def test_relay_stops_reading_while_a_direction_is_full():
    """A target that never reads: with backpressure the sender stalls after kernel buffers plus the
    relay's 64 KiB; without it the relay would swallow everything offered."""
    offered = 64 << 20
    release = threading.Event()

    def never_reads(sock: socket.socket) -> None:
        release.wait(IO_TIMEOUT_S)

    with tcp_server(never_reads) as port, \
            Relay(0, ("127.0.0.1", port), 0.0, max_pending_bytes=64 << 10) as relay, connect(relay.port) as s:
        s.setblocking(False)
        block = bytes(1 << 16)
        pushed, last_progress = 0, time.monotonic()
        end = last_progress + 5.0
        while pushed < offered and time.monotonic() < end and time.monotonic() - last_progress < 0.5:
            try:
                pushed += s.send(block)
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        release.set()
    assert pushed < 24 << 20, f"{pushed} bytes accepted by a relay whose target reads nothing"


def test_relay_flushes_before_passing_on_a_close():
    """A target that says a lot and hangs up at once: the client gets every byte, then the close."""
    speech = os.urandom(200_000)

    def say_and_hang_up(sock: socket.socket) -> None:
        sock.sendall(speech)

    with tcp_server(say_and_hang_up) as port, Relay(0, ("127.0.0.1", port), 0.020) as relay, \
            connect(relay.port) as s:
        assert recv_all(s) == speech
        assert wait_for(lambda: relay.connections == 0, IO_TIMEOUT_S)


def test_relay_survives_an_abrupt_disconnect(echo_port, relay_warnings):
    with Relay(0, ("127.0.0.1", echo_port), 0.020) as relay:
        s = connect(relay.port)
        s.sendall(b"x" * 10_000)  # its echo is still held in the relay when the client vanishes
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # linger 0: the kernel sends RST, not FIN
        # Both sides of the dead pair are closed, the target side too.
        assert wait_for(lambda: relay.connections == 0, IO_TIMEOUT_S)
        with connect(relay.port) as s2:
            assert round_trip_s(s2, b"still here") >= 0.040
    assert relay_warnings() == []


def test_relay_stop_closes_open_connections_and_is_idempotent(echo_port):
    relay = Relay(0, ("127.0.0.1", echo_port), 0.0)
    relay.start()
    try:
        s = connect(relay.port)
        round_trip_s(s, b"hello")
    finally:
        relay.stop()
    with s:
        assert s.recv(16) == b""  # closed by the relay, not left hanging
    relay.stop()
    with pytest.raises(OSError):
        connect(relay.port).close()


def test_relay_to_an_unreachable_target_closes_the_client(relay_warnings):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with Relay(0, ("127.0.0.1", dead_port), 0.0) as relay, connect(relay.port) as s:
            assert s.recv(16) == b""
    assert any("cannot reach" in r.getMessage() for r in relay_warnings())


def test_relay_start_fails_on_a_port_in_use(echo_port):
    with socket.create_server(("127.0.0.1", 0), reuse_port=False) as taken:
        relay = Relay(taken.getsockname()[1], ("127.0.0.1", echo_port), 0.0)
        with pytest.raises(TransportError):
            relay.start()
        relay.stop()


# --------------------------------------------------------------------------- prototype server


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def ask(s: socket.socket, body: bytes) -> str:
    s.sendall(struct.pack(">I", len(body)) + body)
    (length,) = struct.unpack(">I", recv_exact(s, 4))
    return recv_exact(s, length).decode("utf-8")


class _OpenOnUnpickle:
    """Unpickling this creates a file: proof that a server executed what it was sent."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(MODEL)


@pytest.fixture
def server():
    with PrototypeServer(model_path=MODEL) as srv:
        yield srv


def noise_crops(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(n)]


def test_prototype_answers_the_models_label(server, classifier):
    crops = real_faces(8) + noise_crops(2)
    expected = [classifier.labels[int(np.argmax(classifier.predict(c)))] for c in crops]
    # The shipped model calls most faces one thing; the noise crops keep a constant answer from passing.
    assert len(set(expected)) >= 2, expected
    with connect(server.port) as s:
        assert [ask(s, npy(c)) for c in crops] == expected


def test_prototype_service_time_pads_every_answer(classifier):
    face = real_faces(1)[0]
    with PrototypeServer(model_path=MODEL, service_time_ms=30) as srv, connect(srv.port) as s:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            label = ask(s, npy(face))
            times.append(time.perf_counter() - t0)
    assert label in classifier.labels
    assert min(times) >= 0.030, times


@pytest.mark.parametrize("name", ["pickled object array", "not npy", "float32", "3-D", "huge declared shape",
                                  "truncated"])
def test_prototype_answers_error_for_a_bad_request_then_serves_on(server, classifier, tmp_path, name):
    face = real_faces(1)[0]
    canary = tmp_path / "unpickled"
    huge = io.BytesIO()  # a valid header promising 10 GB of pixels, followed by a few bytes
    np.lib.format.write_array_header_1_0(huge, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000)})
    bodies = {
        "pickled object array": npy(np.array([_OpenOnUnpickle(canary), 1], dtype=object), allow_pickle=True),
        "not npy": b"\x80\x04 certainly not an array",
        "float32": npy(face.astype(np.float32)),
        "3-D": npy(face[None]),
        "huge declared shape": huge.getvalue() + bytes(64),
        "truncated": npy(face)[:-100],
    }
    expected = classifier.labels[int(np.argmax(classifier.predict(face)))]
    with connect(server.port) as s:
        reply = ask(s, bodies[name])
        assert reply.startswith("ERROR: "), reply
        assert ask(s, npy(face)) == expected
    assert not canary.exists(), "the server unpickled what it was sent"


def test_prototype_refuses_a_length_over_the_limit_then_serves_others(server, classifier):
    face = real_faces(1)[0]
    with connect(server.port) as s:
        s.sendall(struct.pack(">I", MAX_REQUEST_BYTES + 1))
        (length,) = struct.unpack(">I", recv_exact(s, 4))
        assert recv_exact(s, length).decode().startswith("ERROR: ")
        assert s.recv(16) == b""  # the stream cannot be resynchronised: the server hangs up
    with connect(server.port) as s:
        assert ask(s, npy(face)) == classifier.labels[int(np.argmax(classifier.predict(face)))]


def test_prototype_start_fails_on_a_bad_model(tmp_path):
    bad = tmp_path / "nothing.tflite"
    bad.write_bytes(b"not a model")
    srv = PrototypeServer(model_path=bad)
    with pytest.raises(ModelError):
        srv.start()
    srv.stop()


# --------------------------------------------------------------------------- prototype client


def test_prototype_client_fills_windows(server):
    result = run_prototype_client("127.0.0.1", server.port, real_faces(1)[0], window_s=0.3, windows=2)
    assert len(result.windows) == 2
    for w in result.windows:
        assert w.results > 0 and w.errors == 0
        assert len(w.latencies_ms) == w.results and all(x > 0 for x in w.latencies_ms)
    assert result.unanswered == 0
    assert result.sent >= sum(w.results for w in result.windows)
    assert result.merged()["p50_ms"] is not None


def test_prototype_client_counts_error_replies(server):
    wrong_size = np.zeros((40, 40), np.uint8)  # the model takes 48 x 48
    result = run_prototype_client("127.0.0.1", server.port, wrong_size, window_s=0.2, windows=1)
    assert result.windows[0].errors > 0
    assert result.windows[0].results == 0 and result.windows[0].latencies_ms == []


def test_prototype_behind_a_relay_is_bound_by_the_round_trip(server):
    """One face per round trip: 2 x 10 ms of link delay caps the prototype at 50 faces/s."""
    with Relay(0, ("127.0.0.1", server.port), 0.010) as relay:
        result = run_prototype_client("127.0.0.1", relay.port, real_faces(1)[0], window_s=0.3, windows=2)
    latencies = [x for w in result.windows for x in w.latencies_ms]
    assert latencies and min(latencies) >= 20.0
    assert all(0 < w.results <= 0.3 / 0.020 for w in result.windows), [w.results for w in result.windows]


# --------------------------------------------------------------------------- command lines


@contextmanager
def command(*args: str):
    """A ``python -m`` process whose first stdout line is its ready line; always terminated."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(30), "no ready line within 30 s"
        yield proc, proc.stdout.readline()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(IO_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(IO_TIMEOUT_S)
        proc.stdout.close()
        proc.stderr.close()


def test_relay_command_line(echo_port):
    with command("fer_swarm.bench.relay", "--listen", "0", "--target", f"127.0.0.1:{echo_port}",
                 "--delay-ms", "5") as (proc, ready):
        assert ready.startswith("relay 127.0.0.1:") and ready.rstrip().endswith(
            f"-> 127.0.0.1:{echo_port}, one-way delay 5 ms"), ready
        port = int(ready.split()[1].rsplit(":", 1)[1].rstrip(","))
        with connect(port) as s:
            assert round_trip_s(s, b"ping") >= 0.010
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(IO_TIMEOUT_S) == 0


def test_prototype_command_line(classifier):
    face = real_faces(1)[0]
    with command("fer_swarm.bench.prototype", "serve", "--port", "0", "--model", str(MODEL)) as (proc, ready):
        assert ready.startswith("prototype server on 127.0.0.1:"), ready
        port = int(ready.split()[3].rsplit(":", 1)[1].rstrip(","))
        with connect(port) as s:
            assert ask(s, npy(face)) == classifier.labels[int(np.argmax(classifier.predict(face)))]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(IO_TIMEOUT_S) == 0
