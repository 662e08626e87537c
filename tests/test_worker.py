"""A real `fer-swarm worker` process against a ROUTER socket the test binds as the broker.

Real process, real signals, real model, real Prometheus endpoint: the test
plays the broker's side of docs/protocol.md by hand so it can see every
message the worker sends, in order (READY, replies, DISCONNECT).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import zmq

from fer_swarm import protocol as p

from .swarm import free_port, real_faces, wait_for, zmq_context

STARTUP_S = 90  # loading the model on a loaded 2-core machine


class WorkerProc:
    """``fer-swarm worker`` in a subprocess; its log lines collected as they come."""

    def __init__(self, broker: str, *args: str):
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fer_swarm", "worker", "--broker", broker, "--threads", "1", "--name", "w1",
             "--metrics-port", str(self.metrics_port), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def logged(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def metric(self, name: str) -> float | None:
        """One sample of the worker's /metrics, by its full name with labels; None if absent or unreachable."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                body = r.read().decode()
        except OSError:
            return None
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


class FakeBroker:
    """The broker's backend socket, driven by the test."""

    def __init__(self, ctx: zmq.Context, endpoint: str = "tcp://127.0.0.1:0"):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.identity: bytes | None = None

    def recv(self, timeout_s: float) -> p.Message | None:
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if self.sock.poll(left * 1000):
                self.identity, msg = p.decode_routed(self.sock.recv_multipart())
                if not isinstance(msg, p.Heartbeat):
                    return msg
        return None

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart(p.encode_routed(self.identity, msg))

    def job(self, n: int, width: int = 48) -> p.Job:
        crop = real_faces(n + 1)[n]
        if width != 48:
            crop = crop[:, :width].copy()
        job = p.Job(ids=(p.CorrelationId(stream="t", frame=n, face=0),), job=n, deadline_ms=60_000,
                    width_px=crop.shape[1], height_px=crop.shape[0], payloads=(crop.tobytes(),))
        self.send(job)
        return job


@pytest.fixture
def ctx():
    with zmq_context() as c:
        yield c


def start(ctx, *args: str) -> tuple[FakeBroker, WorkerProc, p.Ready]:
    broker = FakeBroker(ctx)
    # A broker that never heartbeats: the worker must not leave it for silence during the test.
    worker = WorkerProc(broker.endpoint, "--liveness", "1000", *args)
    ready = broker.recv(STARTUP_S)
    if not isinstance(ready, p.Ready):
        worker.stop()
        pytest.fail(f"no READY from the worker: {ready!r}\n" + "\n".join(worker.lines))
    return broker, worker, ready


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_jobs_in_hand_then_disconnects_and_exits_0(ctx, sig):
    broker, worker, ready = start(ctx, "--service-time-ms", "1500", "--drain-grace-s", "60")
    try:
        assert ready.worker == "w1"
        jobs = [broker.job(1), broker.job(2)]
        assert wait_for(lambda: worker.metric("fer_swarm_worker_jobs_in_flight") == 2, 30), "jobs never in hand"
        worker.proc.send_signal(sig)
        assert wait_for(lambda: worker.logged("draining"), 30), "\n".join(worker.lines)
        late = broker.job(3)  # arrives while draining: refused, not taken
        replies = []
        while (msg := broker.recv(30)) is not None:
            replies.append(msg)
            if isinstance(msg, p.Disconnect):
                break
        assert worker.proc.wait(30) == 0, "\n".join(worker.lines)
    finally:
        worker.stop()
    assert [type(m).__name__ for m in replies].count("Result") == 2 and isinstance(replies[-1], p.Disconnect)
    results = {m.job: m for m in replies if isinstance(m, p.Result)}
    assert set(results) == {j.job for j in jobs}
    assert all(results[j.job].faces[0].id == j.ids[0] for j in jobs)
    busy = [m for m in replies if isinstance(m, p.Busy)]
    assert [(b.job, b.reason) for b in busy] == [(late.job, "worker draining")]


def test_a_drain_that_outlasts_its_grace_still_disconnects_and_exits_0(ctx):
    broker, worker, _ = start(ctx, "--service-time-ms", "20000", "--drain-grace-s", "0.5")
    try:
        broker.job(1)
        assert wait_for(lambda: worker.metric("fer_swarm_worker_jobs_in_flight") == 1, 30)
        worker.proc.send_signal(signal.SIGTERM)
        first = broker.recv(30)  # the job's 20 s are not waited for: DISCONNECT comes, not its RESULT
        assert worker.proc.wait(30) == 0, "\n".join(worker.lines)
    finally:
        worker.stop()
    assert isinstance(first, p.Disconnect), first
    assert worker.logged("leaving with 1 job(s) unfinished")


def test_metrics_endpoint_counts_jobs_faces_and_registration(ctx):
    broker, worker, ready = start(ctx)
    try:
        broker.job(1)
        assert isinstance(broker.recv(30), p.Result)
        broker.job(2, width=40)  # not the model's crop size: answered ERROR
        assert isinstance(broker.recv(30), p.Error)
        m = worker.metric
        assert m('fer_swarm_worker_jobs_total{outcome="result"}') == 1
        assert m('fer_swarm_worker_jobs_total{outcome="error"}') == 1
        assert m('fer_swarm_worker_jobs_total{outcome="busy"}') == 0
        assert m("fer_swarm_worker_faces_total") == 1 and m("fer_swarm_worker_inference_seconds_count") == 1
        assert m("fer_swarm_worker_jobs_in_flight") == 0 and m("fer_swarm_worker_connected") == 1
        assert m("fer_swarm_worker_registrations_total") == 1 and m("fer_swarm_worker_threads") == 1
        model = f"{ready.model.name}:{ready.model.version}"
        assert m(f'fer_swarm_worker_info{{model="{model}",name="w1"}}') == 1
    finally:
        worker.stop()


def test_no_broker_at_the_address_is_said_so_and_the_worker_joins_when_one_comes(ctx):
    port = free_port()
    worker = WorkerProc(f"tcp://127.0.0.1:{port}", "--heartbeat-interval-s", "0.1", "--liveness", "3",
                        "--reconnect-initial-s", "0.1", "--reconnect-max-s", "0.5")
    try:
        assert wait_for(lambda: worker.logged("nothing accepted a connection") >= 2, STARTUP_S), "\n".join(worker.lines)
        assert not worker.logged("broker silent")
        broker = FakeBroker(ctx, f"tcp://127.0.0.1:{port}")
        assert isinstance(broker.recv(30), p.Ready)
    finally:
        worker.stop()


def test_jobs_beyond_two_per_credit_are_answered_busy_not_held(ctx):
    """Memory is bounded by jobs in hand, whatever a broker sends: capacity 1 holds at most 2."""
    from .swarm import WorkerThread

    broker = FakeBroker(ctx)
    worker = WorkerThread(ctx, broker.endpoint, capacity=1, service_time_ms=3000, liveness=1000, drain_grace_s=0)
    try:
        assert isinstance(broker.recv(STARTUP_S), p.Ready)
        for n in range(10):
            broker.job(n)
        busy = [broker.recv(30) for _ in range(8)]
        assert all(isinstance(b, p.Busy) and "queue is full" in b.reason for b in busy), busy
        assert {b.job for b in busy} == set(range(2, 10)) and worker.worker.in_hand == 2
    finally:
        worker.stop()


def test_a_broker_of_another_protocol_version_is_named(ctx, caplog):
    from .swarm import WorkerThread

    caplog.set_level(logging.ERROR, logger="fer_swarm.worker.worker")
    broker = FakeBroker(ctx)
    worker = WorkerThread(ctx, broker.endpoint, liveness=1000, reconnect_initial_s=0.05, reconnect_max_s=0.2)
    try:
        for _ in range(2):  # told at every registration, not once
            assert isinstance(broker.recv(STARTUP_S), p.Ready)
            broker.sock.send_multipart([broker.identity, b"fer-swarm/4", b"ERROR", b'{"ids":[],"reason":"version"}'])
        assert wait_for(lambda: sum("speaks fer-swarm/4, this worker fer-swarm/" in r.getMessage()
                                    for r in caplog.records) >= 2, 20), caplog.text
    finally:
        worker.stop()
