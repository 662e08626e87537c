"""Real swarm parts for tests: a broker thread, worker threads or processes, and a protocol client.

Everything binds to 127.0.0.1 on ports the OS picks; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zmq

from fer_swarm import protocol as p
from fer_swarm import security
from fer_swarm.broker import Broker
from fer_swarm.config import BrokerSettings, WorkerSettings
from fer_swarm.errors import TransportError
from fer_swarm.worker import Worker

FAST = dict(heartbeat_interval_s=0.1, liveness=3)  # a lost peer is noticed in 0.3 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerThread:
    def __init__(self, ctx: zmq.Context, frontend: str | None = None, backend: str | None = None, **overrides):
        settings = BrokerSettings(
            frontend=frontend or "tcp://127.0.0.1:0", backend=backend or "tcp://127.0.0.1:0", **{**FAST, **overrides}
        )
        # A restarted broker may find its old port still being released by libzmq's I/O thread.
        end = time.monotonic() + 5
        while True:
            try:
                self.broker = Broker(settings, ctx)
                break
            except TransportError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.frontend = self.broker.frontend_endpoint
        self.backend = self.broker.backend_endpoint
        self.thread = threading.Thread(target=self.broker.serve, name="broker", daemon=True)
        self.thread.start()

    @property
    def scheduler(self):
        return self.broker.scheduler

    def stop(self, drain: bool = False) -> None:
        self.broker.stop(drain=drain)
        self.thread.join(5 + (self.broker.settings.drain_grace_s if drain else 0))
        assert not self.thread.is_alive(), "broker did not stop"
        self.broker.close()


class WorkerThread:
    def __init__(self, ctx: zmq.Context, backend: str, **overrides):
        self.worker = Worker(WorkerSettings(broker=backend, **{**FAST, "reconnect_initial_s": 0.1, **overrides}), ctx)
        self.thread = threading.Thread(target=self.worker.serve, name="worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "worker did not stop"


class WorkerProcess:
    """A worker as its own OS process, so a test can kill it without warning (SIGKILL)."""

    def __init__(self, backend: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fer_swarm", "-q", "worker", "--broker", backend,
             "--heartbeat-interval-s", "0.1", "--liveness", "3", "--reconnect-initial-s", "0.1", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


class Client:
    """An edge-side DEALER that speaks the protocol, for driving the broker directly."""

    def __init__(self, ctx: zmq.Context, frontend: str, stream: str = "test", curve=None, identity: bytes | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if identity:
            self.sock.identity = identity
        if curve:
            security.make_client(self.sock, *curve)
        self.sock.connect(frontend)
        self.stream = stream

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart(p.encode(msg))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def job(self, frame: int, face: int = 0, crop: np.ndarray | None = None, deadline_ms: int = 5000) -> p.CorrelationId:
        """A JOB of one crop; its id."""
        crop = np.zeros((48, 48), np.uint8) if crop is None else crop
        return self.frame_job(frame, [crop], deadline_ms, first_face=face)[0]

    def frame_job(self, frame: int, crops: list[np.ndarray], deadline_ms: int = 5000,
                  first_face: int = 0) -> tuple[p.CorrelationId, ...]:
        """One JOB carrying ``crops`` as faces of ``frame``, as the edge sends them; their ids."""
        ids = tuple(p.CorrelationId(stream=self.stream, frame=frame, face=first_face + i) for i in range(len(crops)))
        self.send(p.Job(ids=ids, deadline_ms=deadline_ms, width_px=crops[0].shape[1], height_px=crops[0].shape[0],
                        payloads=tuple(c.tobytes() for c in crops)))
        return ids

    def recv(self, timeout_s: float = 5.0) -> p.Message | None:
        if self.sock.poll(timeout_s * 1000):
            return p.decode(self.sock.recv_multipart())
        return None

    def collect(self, n: int, timeout_s: float = 10.0) -> list[p.Message]:
        """Up to ``n`` replies, waiting at most ``timeout_s`` in all."""
        out: list[p.Message] = []
        end = time.monotonic() + timeout_s
        while len(out) < n and (left := end - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None:
                out.append(msg)
        return out

    def welcome(self, timeout_s: float = 5.0) -> p.Welcome:
        """HELLO until the broker announces a model (a worker has registered)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.send(p.Hello(client="test"))
            msg = self.recv(0.2)
            if isinstance(msg, p.Welcome) and msg.model is not None:
                return msg
            time.sleep(0.05)
        raise AssertionError("no worker registered in time")

    def close(self) -> None:
        self.sock.close(0)


def wait_for(predicate, timeout_s: float = 5.0, interval_s: float = 0.02) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@contextmanager
def zmq_context():
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def real_faces(n: int) -> list[np.ndarray]:
    """Distinct 48x48 gray crops of real faces (scikit-image's bundled LFW subset), cycled to ``n``."""
    import cv2
    from skimage import data

    faces = data.lfw_subset()  # 200 x 25 x 25 floats in [0, 1]
    crops = [cv2.resize((f * 255).astype(np.uint8), (48, 48), interpolation=cv2.INTER_CUBIC) for f in faces]
    return [crops[i % len(crops)] for i in range(n)]


MODEL = Path(__file__).resolve().parent.parent / "models" / "fer-res.tflite"
