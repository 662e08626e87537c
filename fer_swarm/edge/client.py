"""The edge's one connection to the broker: a ZeroMQ DEALER speaking docs/protocol.md.

This is the edge's only socket, and the one place where ``zmq.ZMQError``
becomes :class:`TransportError`. Sending never blocks: a frame's faces must
not wait for a slow network, so a job the socket cannot take at once is
reported to the caller as failed, not queued.

Nothing is queued for a broker we are not connected to: the socket sets
``ZMQ_IMMEDIATE``, so while the connection is down (not yet up, or lost and
being retried by libzmq) ``send_job`` returns False at once and the caller
counts those faces as unsent, instead of libzmq holding them and delivering
them to a restarted broker seconds late.

Jobs in flight when the connection drops get no reply: a restarted broker
never saw them, and a reply on its way is lost with the connection. A client
must therefore time out every job itself at its deadline (the edge's pipeline
shows such a face unlabelled once the frame's display delay is over and
counts the job as timed out); :class:`SwarmClient` logs the loss and the
reconnection, but cannot name the jobs.

:meth:`SwarmClient.connect` says what went wrong, within ``connect_timeout_s``
(see ``fer_swarm.linkwatch`` for what libzmq reports in each case): nothing
answers at the address, the broker refused our key, our broker key is not the
broker's, the broker wants CURVE (or does not), it speaks another protocol
version, or it answered but has no worker yet.

Bounded memory: at most ``hwm`` JOBs (default 64) wait in the socket toward
the broker, each at most 16 crops at the model's size (2.4 MB at 48x48 in the
worst case), and at most ``RECV_HWM`` replies wait to be read, each frame at
most ``MAX_MESSAGE_BYTES`` (``ZMQ_MAXMSGSIZE``), with headers of at most 8 KiB
by the protocol: 8 MiB.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import zmq

from ..errors import ProtocolError, TransportError
from ..linkwatch import Change, LinkWatch, Liveness, foreign_version
from ..security import KeyPair, make_client
from ..protocol import (
    PROTOCOL_TAG, Busy, CorrelationId, Disconnect, Error, Expired, Heartbeat, Hello, Job, Result, Welcome, decode,
    encode,
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
# Largest frame accepted from the broker: replies are JSON headers of at most 8 KiB.
MAX_MESSAGE_BYTES = 16384
# Replies waiting to be read at most; beyond it libzmq stops reading and the broker's side fills.
RECV_HWM = 1000
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

    ``hwm`` bounds the JOBs queued toward the broker; past it ``send_job`` reports failure.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        *,
        name: str = "fer-swarm edge",
        connect_timeout_s: float = 10.0,
        hwm: int = 64,
        curve: tuple[KeyPair, bytes] | None = None,
    ):
        self.endpoint = endpoint
        self.name = name[:64]
        self.connect_timeout_s = connect_timeout_s
        self.welcome: Welcome | None = None
        self._last_sent = time.monotonic()
        self._liveness: Liveness | None = None  # from WELCOME on
        self._silent = False
        self._refusal: str | None = None  # the broker's answer that ends connect(), in words
        self._watch: LinkWatch | None = None
        with _transport(f"cannot connect to {endpoint}"):
            self._socket = context.socket(zmq.DEALER)
            try:
                self._socket.setsockopt(zmq.LINGER, 0)  # closing must never hang on unsent jobs
                self._socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a broker we are not connected to
                self._socket.setsockopt(zmq.SNDHWM, hwm)
                self._socket.setsockopt(zmq.RCVHWM, RECV_HWM)
                self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
                if curve:
                    make_client(self._socket, *curve)
                self._watch = LinkWatch(self._socket, endpoint, role="client", curve=curve)
                self._socket.connect(endpoint)
            except zmq.ZMQError:
                if self._watch is not None:
                    self._watch.close()
                self._socket.close(linger=0)
                raise
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._watch.monitor, zmq.POLLIN)

    def connect(self) -> Welcome:
        """Say HELLO until the broker answers with a WELCOME that names the pool's model.

        HELLO is repeated every 0.5 s because WELCOME's model is null until a
        worker has registered, and the broker announces a model only when asked.
        Raises TransportError as soon as the broker refuses us (key, encryption,
        protocol version, an ERROR or DISCONNECT answer), or after
        ``connect_timeout_s`` saying how far the connection got.
        """
        deadline = time.monotonic() + self.connect_timeout_s
        next_hello = 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_hello and self._watch.up:  # before the handshake, IMMEDIATE would refuse it
                self._send(Hello(client=self.name))
                next_hello = now + HELLO_INTERVAL_S
            wait_s = (min(next_hello, deadline) if self._watch.up else deadline) - time.monotonic()
            for reply in self._receive(int(1000 * max(0.0, wait_s))):
                if isinstance(reply, Error) and not reply.ids:
                    self._refusal = f"the broker at {self.endpoint} answered HELLO with ERROR: {reply.reason}"
            if self._watch.failure:
                raise TransportError(self._watch.failure)
            if self._refusal:
                raise TransportError(self._refusal)
            if self.welcome is not None and self.welcome.model is not None:
                model = self.welcome.model
                log.info("connected to %s: model %s (%dx%d), %d worker(s)", self.endpoint, model.ref,
                         model.width_px, model.height_px, self.welcome.workers)
                return self.welcome
        if self.welcome is not None:
            raise TransportError(
                f"the broker at {self.endpoint} answered but no worker is registered "
                f"(waited {self.connect_timeout_s:g} s): start one with `fer-swarm worker`"
            )
        raise TransportError(self._watch.explain_silence(self.connect_timeout_s))

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
            self._watch.close()
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
            events = dict(self._poller.poll(max(0, timeout_ms)))
            if self._watch.monitor in events:
                self._on_link(self._watch.update())
            if self._socket not in events:
                return
            for _ in range(MAX_REPLIES_PER_POLL):
                try:
                    frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    return
                try:
                    msg = decode(frames)
                except ProtocolError as e:
                    theirs = foreign_version(frames)
                    if theirs and not self._refusal:
                        self._refusal = (f"the broker at {self.endpoint} speaks {theirs}, this client "
                                         f"{PROTOCOL_TAG.decode()}: install the same fer-swarm version on both")
                        log.error("%s", self._refusal)
                    elif not theirs:
                        log.warning("malformed message from the broker dropped: %s", e)
                    continue
                self._heard()
                if isinstance(msg, (Result, Expired, Busy, Error)):
                    yield msg
                elif isinstance(msg, Welcome):
                    self._welcomed(msg)
                elif isinstance(msg, Disconnect):
                    reason = msg.reason or "no reason given"
                    if self.welcome is None:  # e.g. the workers' port answering a stranger
                        self._refusal = (f"the broker at {self.endpoint} sent DISCONNECT: {reason} "
                                         "(is this the broker's port for clients?)")
                    log.warning("the broker at %s disconnected us: %s", self.endpoint, reason)
                elif not isinstance(msg, Heartbeat):
                    log.warning("unexpected %s from the broker dropped", msg.command.value)

    def _on_link(self, changes: list[Change]) -> None:
        for change in changes:
            if change is Change.LOST:
                log.warning("lost the connection to the broker at %s; jobs in flight get no reply and time out "
                            "at their deadline, new ones count as unsent until it is back", self.endpoint)
            elif change is Change.UP and self.welcome is not None:
                log.info("connection to the broker at %s is back", self.endpoint)
            elif change is Change.FAILED and self.welcome is not None:
                log.error("%s", self._watch.failure)

    def _welcomed(self, msg: Welcome) -> None:
        old = self.welcome.model if self.welcome is not None else None
        if old is not None and msg.model is not None and msg.model != old:
            # Crops are made for the model we connected with; a new one needs a new client.
            log.warning("the pool's model changed from %s to %s; keeping %s crops", old.ref, msg.model.ref, old.ref)
            return
        if old is None or msg.model is not None:
            self.welcome = msg

    def _heard(self) -> None:
        if self._liveness is not None:
            self._liveness.heard(time.monotonic())
        if self._silent:
            self._silent = False
            log.info("the broker at %s is answering again", self.endpoint)

    def _keep_alive(self) -> None:
        """HEARTBEAT when we have sent nothing for an interval; report a broker gone silent."""
        if self.welcome is None:
            return
        interval = self.welcome.heartbeat_interval_s
        now = time.monotonic()
        if self._liveness is None:
            self._liveness = Liveness(interval, LIVENESS, now)
        if now - self._last_sent >= interval:
            self._send(Heartbeat())
        # Silence counts this loop's running time, not a stall of the edge's own (see linkwatch.Liveness).
        if self._liveness.tick(now) and not self._silent:
            self._silent = True
            log.warning("the broker at %s has been silent for %.1f s; jobs in flight are lost",
                        self.endpoint, self._liveness.silent_s)
