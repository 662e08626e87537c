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

Memory is bounded per connection as well as in the scheduler's queues:
libzmq holds at most ``CLIENT_RCVHWM`` JOBs from one client connection before
it stops reading that connection (at most 16 crops of ``max_message_bytes``
each, plus a header, per JOB), and at most ``CLIENT_SNDHWM`` replies for a
client that does not read them, after which the broker forgets the client
and drops its replies. docs/protocol.md states the resulting figures.

A worker that goes away is noticed at once where the transport can tell: a
socket monitor reports the disconnection, and the broker then probes its
workers (a send to a departed peer fails at once, ``ROUTER_MANDATORY``), so a
killed worker's jobs are re-dispatched within milliseconds, not at the next
heartbeat. ZMTP heartbeats close connections that went silent without a
word (a partition), so no "ghost" worker stays registered.

:meth:`Broker.stop` drains: new jobs are answered BUSY, jobs queued or at
workers still get their answers for up to ``drain_grace_s``, the rest ERROR;
then workers are told DISCONNECT. A second :meth:`stop` ends it at once.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from .. import protocol as p
from .. import security, telemetry, transport
from ..config import BrokerSettings
from ..errors import ProtocolError, TransportError
from .observe import BrokerMetrics, status_report
from .scheduler import MAX_WRONG_REPLIES, Reply, Scheduler

log = logging.getLogger(__name__)

BATCH = 256  # messages drained from one socket before looking at the other
TICK_S = 0.005  # how often deadlines are checked when nothing arrives
CLIENT_RCVHWM = 32  # JOBs libzmq holds per client connection before it stops reading it
CLIENT_SNDHWM = 256  # replies held for a client not reading them; past it the client is forgotten
WORKER_HWM = 2048  # per worker connection, each way: above any capacity a worker may announce (1024)
PROBE_FOR_S = 0.25  # after a worker connection drops, probe the workers for this long...
PROBE_EVERY_S = 0.01  # ...this often: the departed peer's pipe goes away a moment after the event
PUBLISH_EVERY_S = 0.25  # how often the gauges a metrics scrape reads are refreshed


class Broker:
    """Bind, then :meth:`serve` until :meth:`stop` is called (from any thread)."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None):
        self.settings = settings
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.scheduler = Scheduler(settings)
        self.metrics = BrokerMetrics(self.scheduler)
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._next_heartbeat = 0.0
        self._next_check = 0.0
        self._next_publish = 0.0
        self._probe_until = 0.0
        self._next_probe = 0.0
        self._started = time.monotonic()
        self._auth = None
        self._monitor = None
        self._metrics_endpoint = None
        try:
            self.security = security.broker_security(settings)
            if self.security:
                # The ZAP handler must be running before the first handshake: a CURVE server
                # without one accepts any client key.
                self._auth = security.start_authenticator(self.ctx, self.security.clients, self.security.workers)
            self.frontend = self._router(settings.frontend, security.CLIENTS_DOMAIN, CLIENT_SNDHWM, CLIENT_RCVHWM)
            try:
                self.backend = self._router(settings.backend, security.WORKERS_DOMAIN, WORKER_HWM, WORKER_HWM)
                # ZMTP heartbeats: a worker connection silent this long (a partition, a frozen host) is closed
                # by libzmq, so the broker stops counting on it.
                self.backend.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(settings.heartbeat_interval_s * 1000)))
                self.backend.setsockopt(zmq.HEARTBEAT_TIMEOUT,
                                        max(1, int(settings.heartbeat_interval_s * settings.liveness * 1000)))
                self._monitor = self.backend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                self._metrics_endpoint = telemetry.serve(self.metrics.registry, settings.metrics_port,
                                                         settings.metrics_host)
            except BaseException:
                self._close_sockets()
                raise
        except BaseException:
            self._close_auth_and_context()
            raise

    def _router(self, endpoint: str, domain: str, sndhwm: int, rcvhwm: int) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if self.security:
            security.make_server(sock, self.security.keys, domain)
        # Oversized frames are refused by libzmq itself, which drops that sender's connection.
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.sndhwm, sock.rcvhwm = sndhwm, rcvhwm
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

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_endpoint.port if self._metrics_endpoint else None

    def stop(self, drain: bool = True) -> None:
        """Stop serving (from any thread): drain first (see the module's docstring); a second call, or
        ``drain=False``, stops at once, still answering every job ERROR."""
        if drain and not self._drain.is_set():
            self._drain.set()
        else:
            self._stop.set()

    def close(self) -> None:
        self._close_sockets()
        self._close_auth_and_context()

    def _close_sockets(self) -> None:
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
            self._metrics_endpoint = None
        if self._monitor is not None:
            try:
                self.backend.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(0)
            self._monitor = None
        for name in ("frontend", "backend"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(0)

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
        poller.register(self._monitor, zmq.POLLIN)
        s = self.scheduler
        drain_until = None
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last > self.settings.heartbeat_interval_s:
                    # The broker itself stood still (a starved host): the workers' silence meanwhile is not theirs.
                    s.excuse(now - last)
                last = now
                if self._drain.is_set():
                    if drain_until is None:
                        drain_until = now + self.settings.drain_grace_s
                        s.draining = self.metrics.draining = True
                        log.info("broker draining: new jobs answered BUSY; %d queued and %d at workers get up to "
                                 "%.1f s", s.queued, s.inflight, self.settings.drain_grace_s)
                    if (s.queued == 0 and s.inflight == 0) or now >= drain_until:
                        break
                events = dict(poller.poll(TICK_S * 1000))
                if self._monitor in events:
                    self._on_monitor(time.monotonic())
                if self.backend in events:
                    self._drain_socket(self.backend, self._on_worker)
                if self.frontend in events:
                    self._drain_socket(self.frontend, self._on_client)
                try:
                    self._tick(time.monotonic())
                except Exception:  # as in _drain_socket: a bug may cost a reply, never the broker
                    log.exception("internal error in the broker's timed work")
        finally:
            left = s.abandon("broker shut down before a worker answered")
            if left:
                log.warning("broker stopping: %d job(s) answered ERROR unfinished", len(left))
            self._to_clients(left)
            self._say_goodbye()
            log.info("broker stopped: %s", s.counters)

    def _drain_socket(self, sock: zmq.Socket, handle) -> None:
        # copy=False: the frames keep their connection's metadata (the peer's address, for the status report).
        for _ in range(BATCH):
            if not sock.getsockopt(zmq.EVENTS) & transport.POLLIN:
                return
            frames = sock.recv_multipart(transport.NOBLOCK, copy=False)
            try:
                handle(frames, time.monotonic())
            except Exception:  # a bug must cost one message, never the broker
                log.exception("internal error handling a message; message dropped")

    def _on_monitor(self, now: float) -> None:
        while self._monitor.getsockopt(zmq.EVENTS) & transport.POLLIN:
            self._monitor.recv_multipart(transport.NOBLOCK)
        self._probe_until = now + PROBE_FOR_S

    def _tick(self, now: float) -> None:
        s = self.scheduler
        if now < self._probe_until and now >= self._next_probe:
            # A worker connection dropped: find out which worker it was by the send that fails.
            self._next_probe = now + PROBE_EVERY_S
            for identity in list(s.workers):
                self._to_worker(identity, p.Heartbeat())
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_EVERY_S
            self.metrics.publish()
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

    def _on_client(self, frames: list[zmq.Frame], now: float) -> None:
        try:
            identity, msg = p.decode_routed(frames, max_payload_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            self._reject(e, "client")
            return
        s = self.scheduler
        if isinstance(msg, p.Job):
            self._to_clients(s.submit(identity, msg, now))
        elif isinstance(msg, p.Hello):
            state = s.client(identity, now)
            if state is not None:
                state.peer = _peer(frames)
            st = self.settings
            self._send(self.frontend, identity, p.Welcome(
                model=s.pool_model(), workers=len(s.workers), max_payload_bytes=st.max_message_bytes,
                heartbeat_interval_s=st.heartbeat_interval_s, max_deadline_ms=st.max_deadline_ms,
                max_queue_jobs=st.max_queue_per_client,
                max_queue_bytes=min(st.max_client_bytes, st.max_queue_bytes),
            ))
        elif isinstance(msg, p.Status):
            report = status_report(s, self.settings, started=self._started, draining=s.draining, now=now)
            self._send(self.frontend, identity, p.Report.of(report))
        elif isinstance(msg, p.Heartbeat):
            if s.client(identity, now) is not None:
                self._send(self.frontend, identity, p.Heartbeat())
        elif isinstance(msg, p.Disconnect):
            s.drop_client(identity)
        else:
            self._send(self.frontend, identity, p.error_reply(p.Error, f"a client may not send {msg.command.value}"))

    def _to_clients(self, replies: list[Reply]) -> None:
        for identity, msg in replies:
            self._reply(identity, msg.command, p.encode_routed(identity, msg))

    def _reply(self, identity: bytes, command: p.Command, frames: list) -> None:
        """Send a client one job's terminal reply, counted under that client for the status report."""
        state = self.scheduler.clients.get(identity)
        if self._send_frames(self.frontend, identity, frames) and state is not None:
            state.outcomes[command.value] = state.outcomes.get(command.value, 0) + 1

    # ----------------------------------------------------------------- workers

    def _on_worker(self, frames: list[zmq.Frame], now: float) -> None:
        try:
            identity, msg = p.decode_routed(frames, max_payload_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            self._reject(e, "worker")
            return
        s = self.scheduler
        if isinstance(msg, p.Ready):
            refusal = s.register(identity, msg, now, _peer(frames))
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
            job = s.complete(identity, msg, now)
            if job is not None:
                self._count(msg)
                if isinstance(msg, p.Result):
                    self.metrics.answered(job, now)
                if msg.ids:  # forward the worker's reply as it came: it names the job's ids, checked above
                    self._reply(job.client, msg.command, [job.client, *frames[1:]])
                else:  # a worker that could not read the job: answer with its ids
                    self._to_clients([(job.client, p.error_reply(type(msg), msg.reason, ids=job.msg.ids))])
            elif s.workers[identity].wrong_replies >= MAX_WRONG_REPLIES:
                worker = s.workers[identity]
                log.warning("worker %s disconnected: %d replies did not match the jobs it was sent",
                            worker.name, worker.wrong_replies)
                self._send(self.backend, identity, p.Disconnect(reason="replies do not match the jobs sent"))
                self._to_clients(s.remove_worker(identity, now, "its replies did not match its jobs"))
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


def _peer(frames: list[zmq.Frame]) -> str:
    """The sender's address as libzmq saw it ("" where the transport has none, e.g. inproc)."""
    try:
        return frames[-1].get("Peer-Address") or ""
    except (zmq.ZMQError, AttributeError, TypeError):
        return ""
