"""The edge's one connection to the broker: a ZeroMQ DEALER speaking docs/protocol.md.

This is the edge's only socket, and the one place where ``zmq.ZMQError``
becomes :class:`TransportError`. Sending never blocks: a frame's faces must
not wait for a slow network, so a job the socket cannot take at once is
reported to the caller as failed, not queued.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import zmq

from ..errors import FerSwarmError, ProtocolError, TransportError
from ..security import KeyPair, make_client
from ..protocol import (
    Busy, CorrelationId, Disconnect, Error, Expired, Heartbeat, Hello, Job, Result, Welcome, decode, encode,
)

__all__ = ["SwarmClient", "Reply"]

log = logging.getLogger(__name__)

Reply = Result | Expired | Busy | Error

# How often HELLO is repeated while waiting for a WELCOME with a model.
HELLO_INTERVAL_S = 0.5
# A broker silent this many heartbeat intervals is reported as gone (docs/protocol.md: liveness).
LIVENESS = 3
# Replies read per poll_replies call at most, so one call cannot run unbounded.
MAX_REPLIES_PER_POLL = 1000
# Largest message accepted from the broker: replies are small JSON headers.
MAX_MESSAGE_BYTES = 65536
CLOSE_LINGER_MS = 100


@contextmanager
def _transport(what: str) -> Iterator[None]:
    """The boundary where ZeroMQ's errors become the project's."""
    try:
        yield
    except zmq.ZMQError as e:
        raise TransportError(f"{what}: {e.strerror}") from e


class SwarmClient:
    """A client of the broker's frontend. Not thread-safe: ZeroMQ sockets belong to one thread.

    ``hwm`` bounds the messages queued in each direction; past it ``send_job`` reports failure.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        *,
        name: str = "fer-swarm edge",
        connect_timeout_s: float = 10.0,
        hwm: int = 1000,
        curve: tuple[KeyPair, bytes] | None = None,
    ):
        self.endpoint = endpoint
        self.name = name[:64]
        self.connect_timeout_s = connect_timeout_s
        self.welcome: Welcome | None = None
        self._last_sent = self._last_heard = time.monotonic()
        self._silent = False
        with _transport(f"cannot connect to {endpoint}"):
            self._socket = context.socket(zmq.DEALER)
            try:
                self._socket.setsockopt(zmq.LINGER, 0)  # closing must never hang on unsent jobs
                self._socket.setsockopt(zmq.SNDHWM, hwm)
                self._socket.setsockopt(zmq.RCVHWM, hwm)
                self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
                if curve:
                    make_client(self._socket, *curve)
                self._socket.connect(endpoint)
            except zmq.ZMQError:
                self._socket.close(linger=0)
                raise

    def connect(self) -> Welcome:
        """Say HELLO until the broker answers with a WELCOME that names the pool's model.

        HELLO is repeated every 0.5 s because WELCOME's model is null until a
        worker has registered, and the broker announces a model only when asked.
        Raises FerSwarmError after ``connect_timeout_s``.
        """
        deadline = time.monotonic() + self.connect_timeout_s
        next_hello = 0.0
        answered = False
        while (now := time.monotonic()) < deadline:
            if now >= next_hello:
                self._send(Hello(client=self.name))
                next_hello = now + HELLO_INTERVAL_S
            for _ in self._receive(int(1000 * max(0.0, min(next_hello, deadline) - time.monotonic()))):
                pass  # replies to jobs cannot arrive before we sent any
            if self.welcome is not None:
                answered = True
                if self.welcome.model is not None:
                    model = self.welcome.model
                    log.info("connected to %s: model %s (%dx%d), %d worker(s)", self.endpoint, model.ref,
                             model.width_px, model.height_px, self.welcome.workers)
                    return self.welcome
        if answered:
            raise FerSwarmError(
                f"the broker at {self.endpoint} answered but no worker is registered "
                f"(waited {self.connect_timeout_s:g} s): start one with `fer-swarm worker`"
            )
        raise FerSwarmError(
            f"no broker answered at {self.endpoint} within {self.connect_timeout_s:g} s "
            "(is `fer-swarm broker` running there, and is the address right?)"
        )

    def send_job(self, ids: Sequence[CorrelationId], crops: Sequence[np.ndarray], deadline_ms: int) -> bool:
        """Queue one JOB of face crops (each 2-D uint8, height x width, all one size) without blocking.

        A frame's faces go together, up to MAX_CROPS per JOB; its one reply answers them all.
        False if the socket cannot take it now (the broker is unreachable or its
        queue toward us is full): the caller records those faces as failed.
        """
        height, width = crops[0].shape
        job = Job(ids=tuple(ids), deadline_ms=deadline_ms, width_px=width, height_px=height,
                  payloads=tuple(np.ascontiguousarray(c, dtype=np.uint8).tobytes() for c in crops))
        return self._send(job)

    def poll_replies(self, timeout_ms: int = 0) -> list[Reply]:
        """Job replies received within ``timeout_ms`` (0: only those already here).

        Returns as soon as at least one message has arrived, with everything
        queued behind it. Malformed messages are logged and dropped; WELCOME,
        HEARTBEAT and DISCONNECT are handled here and not returned.
        """
        replies = list(self._receive(timeout_ms))
        self._keep_alive()
        return replies

    def close(self) -> None:
        if not self._socket.closed:
            try:
                self._send(Disconnect(reason="edge closing"))
            except TransportError:
                pass  # leaving anyway; the broker forgets silent clients
            # A short linger lets the DISCONNECT out (so the broker drops our queued
            # jobs at once) without ever hanging on a broker that is gone.
            self._socket.close(linger=CLOSE_LINGER_MS)

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, msg) -> bool:
        with _transport(f"cannot send to {self.endpoint}"):
            try:
                self._socket.send_multipart(encode(msg), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
        self._last_sent = time.monotonic()
        return True

    def _receive(self, timeout_ms: int) -> Iterator[Reply]:
        with _transport(f"cannot receive from {self.endpoint}"):
            if not self._socket.poll(max(0, timeout_ms), zmq.POLLIN):
                return
            for _ in range(MAX_REPLIES_PER_POLL):
                try:
                    frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    return
                self._heard()
                try:
                    msg = decode(frames)
                except ProtocolError as e:
                    log.warning("malformed message from the broker dropped: %s", e)
                    continue
                if isinstance(msg, (Result, Expired, Busy, Error)):
                    yield msg
                elif isinstance(msg, Welcome):
                    self._welcomed(msg)
                elif isinstance(msg, Disconnect):
                    log.warning("the broker at %s disconnected us: %s", self.endpoint, msg.reason or "no reason given")
                elif not isinstance(msg, Heartbeat):
                    log.warning("unexpected %s from the broker dropped", msg.command.value)

    def _welcomed(self, msg: Welcome) -> None:
        old = self.welcome.model if self.welcome is not None else None
        if old is not None and msg.model is not None and msg.model != old:
            # Crops are made for the model we connected with; a new one needs a new client.
            log.warning("the pool's model changed from %s to %s; keeping %s crops", old.ref, msg.model.ref, old.ref)
            return
        if old is None or msg.model is not None:
            self.welcome = msg

    def _heard(self) -> None:
        self._last_heard = time.monotonic()
        if self._silent:
            self._silent = False
            log.info("the broker at %s is answering again", self.endpoint)

    def _keep_alive(self) -> None:
        """HEARTBEAT when we have sent nothing for an interval; report a broker gone silent."""
        if self.welcome is None:
            return
        interval = self.welcome.heartbeat_interval_s
        now = time.monotonic()
        if now - self._last_sent >= interval:
            self._send(Heartbeat())
        if not self._silent and now - self._last_heard >= LIVENESS * interval:
            self._silent = True
            log.warning("the broker at %s has been silent for %.1f s; jobs in flight are lost",
                        self.endpoint, now - self._last_heard)
