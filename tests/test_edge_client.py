"""The edge's SwarmClient against real sockets: what connect() says, and no queueing for an absent broker.

Key and encryption errors are in test_security.py; here: nothing at the
address, a broker of another protocol version, an ERROR or DISCONNECT answer,
a full socket, and a broker restart.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import zmq

from fer_swarm import protocol as p
from fer_swarm.edge.client import SwarmClient
from fer_swarm.errors import TransportError

from .swarm import MODEL, BrokerThread, WorkerThread, free_port, wait_for, zmq_context


@pytest.fixture
def ctx():
    with zmq_context() as c:
        yield c


class Answering(threading.Thread):
    """A ROUTER that answers every message with the given raw frames (after the sender's identity)."""

    def __init__(self, ctx: zmq.Context, frames: list[bytes]):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.frames = frames
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            if self.sock.poll(50):
                identity, *_ = self.sock.recv_multipart()
                self.sock.send_multipart([identity, *self.frames])
        self.sock.close(0)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def crops(n=1):
    return [np.zeros((48, 48), np.uint8)] * n


def ids(frame, n=1):
    return [p.CorrelationId(stream="t", frame=frame, face=k) for k in range(n)]


@pytest.mark.parametrize("frames, expect", [
    ([b"fer-swarm/4", b"ERROR", b'{"ids":[],"reason":"unsupported protocol version"}'],
     "speaks fer-swarm/4, this client fer-swarm/"),
    (p.encode(p.Error(ids=(), reason="malformed message: something")),
     "answered HELLO with ERROR: malformed message: something"),
    (p.encode(p.Disconnect(reason="unknown worker: send READY")),
     "sent DISCONNECT: unknown worker: send READY (is this the broker's port for clients?)"),
], ids=["version", "error", "disconnect"])
def test_connect_reports_the_brokers_answer_at_once(ctx, frames, expect):
    router = Answering(ctx, frames)
    try:
        with SwarmClient(ctx, router.endpoint, connect_timeout_s=30) as client:
            with pytest.raises(TransportError, match="^the broker at") as raised:
                client.connect()
    finally:
        router.stop()
    assert expect in str(raised.value)


def test_connect_says_nothing_accepted_a_connection(ctx):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with SwarmClient(ctx, endpoint, connect_timeout_s=0.5) as client:
        with pytest.raises(TransportError, match=f"no broker answered at {endpoint}.*nothing accepted a connection"):
            client.connect()


def test_a_full_socket_reports_the_job_unsent(ctx):
    """Connected to a peer that never reads: once libzmq's and the kernel's buffers are full, send_job says False."""
    sink = ctx.socket(zmq.ROUTER)
    sink.linger = 0
    sink.rcvhwm = 1
    sink.setsockopt(zmq.RCVBUF, 4096)
    endpoint = f"tcp://127.0.0.1:{sink.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        with SwarmClient(ctx, endpoint, hwm=2) as client:
            assert wait_for(lambda: client.send_job(ids(0), crops(), 100), 10), "the connection never came up"
            sent = [client.send_job(ids(k, 16), crops(16), 100) for k in range(1, 5000)]
    finally:
        sink.close(0)
    assert sent[0] and not sent[-1]


def test_no_jobs_are_queued_while_the_broker_is_down_and_sending_resumes_when_it_is_back(ctx, caplog):
    caplog.set_level(logging.INFO, logger="fer_swarm.edge.client")
    frontend = f"tcp://127.0.0.1:{free_port()}"
    broker = BrokerThread(ctx, frontend=frontend)
    worker = WorkerThread(ctx, broker.backend, model=MODEL)
    try:
        with SwarmClient(ctx, frontend, connect_timeout_s=30) as client:
            client.connect()
            assert client.send_job(ids(1), crops(), 5000)
            assert wait_for(lambda: any(isinstance(r, p.Result) for r in client.poll_replies(100)), 20)
            broker.stop()
            # Once libzmq has seen the connection drop, jobs are refused at once, not queued for later.
            assert wait_for(lambda: not client.send_job(ids(2), crops(), 5000) and not client.poll_replies(20), 20)
            assert "lost the connection to the broker" in caplog.text
            broker = BrokerThread(ctx, frontend=frontend)  # the same address: libzmq reconnects by itself
            assert wait_for(lambda: client.poll_replies(20) == [] and client.send_job(ids(3), crops(), 500), 20)
            assert wait_for(lambda: "is back" in caplog.text, 5)
            # The restarted broker got job 3 and never job 2 (no worker yet: it answers job 3 itself in time).
            replies = []
            assert wait_for(lambda: replies.extend(client.poll_replies(100)) or replies, 20)
            assert {i.frame for r in replies for i in r.ids} == {3}
    finally:
        worker.stop()
        broker.stop()
