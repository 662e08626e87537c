"""The broker process: two ROUTER sockets around the :class:`Scheduler`.

The zguide's load-balancing broker made reliable in the manner of its
Paranoid Pirate and Majordomo patterns: clients (edge devices) talk to the
frontend, workers to the backend; the broker moves bytes and never imports
OpenCV or a model runtime.

One thread owns both sockets. Each loop drains each socket in a bounded batch
(so a flood on one side cannot starve the other), then runs the time-driven
rules (deadlines, silent workers, heartbeats) and dispatches. Anything that
arrives malformed is answered ERROR when its sender can be told, and dropped
otherwise; no input from the network can stop this loop.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .. import protocol as p
from .. import security, transport
from ..config import BrokerSettings
from ..errors import ProtocolError, TransportError
from .scheduler import Reply, Scheduler

log = logging.getLogger(__name__)

BATCH = 256  # messages drained from one socket before looking at the other
TICK_S = 0.005  # how often deadlines are checked when nothing arrives


class Broker:
    """Bind, then :meth:`serve` until :meth:`stop` is called (from any thread)."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None):
        self.settings = settings
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.scheduler = Scheduler(settings)
        self._stop = threading.Event()
        self._next_heartbeat = 0.0
        self._next_check = 0.0
        self._auth = None
        try:
            self.security = security.broker_security(settings)
            if self.security:
                # The ZAP handler must be running before the first handshake: a CURVE server
                # without one accepts any client key.
                self._auth = security.start_authenticator(self.ctx, self.security.clients, self.security.workers)
            self.frontend = self._router(settings.frontend, security.CLIENTS_DOMAIN)
            try:
                self.backend = self._router(settings.backend, security.WORKERS_DOMAIN)
            except BaseException:
                self.frontend.close(0)
                raise
        except BaseException:
            self._close_auth_and_context()
            raise

    def _router(self, endpoint: str, domain: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if self.security:
            security.make_server(sock, self.security.keys, domain)
        # Oversized messages are refused by libzmq itself, which drops only that sender's connection.
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.sndhwm = sock.rcvhwm = 10_000
        # Sending to a peer that is gone raises EHOSTUNREACH instead of dropping silently: that is how
        # the broker learns a client or worker has left, and forgets its jobs.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close()
            raise TransportError(f"cannot bind {endpoint}: {e.strerror}") from e
        return sock

    @property
    def frontend_endpoint(self) -> str:
        return self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def backend_endpoint(self) -> str:
        return self.backend.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.frontend.close(0)
        self.backend.close(0)
        self._close_auth_and_context()

    def _close_auth_and_context(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self.ctx.term()

    # ----------------------------------------------------------------- loop

    def serve(self) -> None:
        log.info("broker serving clients on %s, workers on %s (%s)", self.frontend_endpoint, self.backend_endpoint,
                 f"CURVE, broker key {self.security.keys.fingerprint}" if self.security else "plaintext")
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(TICK_S * 1000))
                if self.backend in events:
                    self._drain(self.backend, self._on_worker)
                if self.frontend in events:
                    self._drain(self.frontend, self._on_client)
                try:
                    self._tick(time.monotonic())
                except Exception:  # as in _drain: a bug may cost a reply, never the broker
                    log.exception("internal error in the broker's timed work")
        finally:
            self._say_goodbye()
            log.info("broker stopped: %s", self.scheduler.counters)

    def _drain(self, sock: zmq.Socket, handle) -> None:
        for frames in transport.drain(sock, BATCH):
            try:
                handle(frames, time.monotonic())
            except Exception:  # a bug must cost one message, never the broker
                log.exception("internal error handling a message; message dropped")

    def _tick(self, now: float) -> None:
        s = self.scheduler
        # Deadlines and liveness once per tick, not once per drained batch: expire() scans every queue
        # and every worker's jobs, and under load the loop turns thousands of times a second.
        if now >= self._next_check:
            self._next_check = now + TICK_S
            self._to_clients(s.expire(now))
            self._to_clients(s.reap_silent_workers(now))
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval_s
            for identity in list(s.workers):
                self._to_worker(identity, p.Heartbeat())
            s.forget_idle_clients(now)
        sends, replies = s.dispatch(now)
        self._to_clients(replies)
        for identity, job in sends:
            self._to_worker(identity, job)

    # ----------------------------------------------------------------- clients

    def _on_client(self, frames: list[bytes], now: float) -> None:
        try:
            identity, msg = p.decode_routed(frames, max_payload_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            self._reject(e, "client")
            return
        s = self.scheduler
        if isinstance(msg, p.Job):
            reply = s.submit(identity, msg, now)
            if reply:
                self._to_clients([reply])
        elif isinstance(msg, p.Hello):
            s.client(identity, now)
            model = s.pool_model()
            self._send(self.frontend, identity, p.Welcome(
                model=model, workers=len(s.workers), max_payload_bytes=self.settings.max_message_bytes,
                heartbeat_interval_s=self.settings.heartbeat_interval_s,
            ))
        elif isinstance(msg, p.Heartbeat):
            if s.client(identity, now) is not None:
                self._send(self.frontend, identity, p.Heartbeat())
        elif isinstance(msg, p.Disconnect):
            s.drop_client(identity)
        else:
            self._send(self.frontend, identity, p.error_reply(p.Error, f"a client may not send {msg.command.value}"))

    def _to_clients(self, replies: list[Reply]) -> None:
        for identity, msg in replies:
            self._send(self.frontend, identity, msg)

    # ----------------------------------------------------------------- workers

    def _on_worker(self, frames: list[bytes], now: float) -> None:
        try:
            identity, msg = p.decode_routed(frames, max_payload_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            self._reject(e, "worker")
            return
        s = self.scheduler
        if isinstance(msg, p.Ready):
            refusal = s.register(identity, msg, now)
            if refusal:
                log.warning("worker %s refused: %s", msg.worker, refusal)
                self._send(self.backend, identity, p.Disconnect(reason=refusal))
            return
        if not s.worker_seen(identity, now):
            # A worker the broker does not know (the broker restarted, or it was declared dead):
            # tell it to register again rather than trusting its state.
            self._send(self.backend, identity, p.Disconnect(reason="unknown worker: send READY"))
            return
        if isinstance(msg, (p.Result, p.Expired, p.Error, p.Busy)):
            job = s.complete(identity, msg.job)
            if job is not None:
                self._count(msg)
                # Forward the worker's reply as it came (it already echoes the client's id).
                self._send_frames(self.frontend, job.client, [job.client, *frames[1:]])
        elif isinstance(msg, p.Disconnect):
            self._to_clients(s.remove_worker(identity, now, f"it disconnected: {msg.reason}" if msg.reason else "it disconnected"))
        elif not isinstance(msg, p.Heartbeat):
            log.warning("worker sent unexpected %s; ignored", msg.command.value)

    def _count(self, msg: p.Message) -> None:
        c = self.scheduler.counters
        if isinstance(msg, p.Result):
            c.results += 1
        elif isinstance(msg, p.Expired):
            c.expired += 1
        elif isinstance(msg, p.Busy):
            c.busy += 1
        else:
            c.errors += 1

    def _to_worker(self, identity: bytes, msg: p.Message) -> None:
        if not self._send(self.backend, identity, msg):
            self._to_clients(self.scheduler.remove_worker(identity, time.monotonic(), "unreachable"))

    # ----------------------------------------------------------------- sending

    def _reject(self, e: ProtocolError, peer: str) -> None:
        identity = getattr(e, "identity", None)
        log.debug("malformed message from %s %s: %s", peer, identity.hex() if identity else "?", e)
        if not identity:
            return
        if peer == "client" and getattr(e, "command", None) == p.Command.JOB:
            self.scheduler.counters.errors += 1
        sock = self.frontend if peer == "client" else self.backend
        self._send(sock, identity, p.error_reply(p.Error, f"malformed message: {e}", ids=getattr(e, "ids", ())))

    def _send(self, sock: zmq.Socket, identity: bytes, msg: p.Message) -> bool:
        return self._send_frames(sock, identity, p.encode_routed(identity, msg))

    def _send_frames(self, sock: zmq.Socket, identity: bytes, frames: list[bytes]) -> bool:
        """Send without blocking; False when the peer is gone or not reading (its reply is then lost with it)."""
        if transport.send_frames(sock, frames):
            return True
        if sock is self.frontend:
            log.debug("client %s unreachable or not reading; forgetting it", identity.hex())
            self.scheduler.drop_client(identity)
        return False

    def _say_goodbye(self) -> None:
        for identity in list(self.scheduler.workers):
            self._send(self.backend, identity, p.Disconnect(reason="broker shutting down"))
