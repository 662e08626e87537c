"""The worker process: one I/O thread with one DEALER socket to the broker, and an inference pool.

Lifecycle, in the manner of the zguide's Paranoid Pirate worker: open a
socket and connect; when the ZeroMQ handshake succeeds, send READY (name,
capacity, model); then serve JOBs and exchange HEARTBEATs. The session ends
when the broker says DISCONNECT, the connection drops, the handshake fails
(a refused key is logged as such every time), or the broker is silent for
``liveness`` heartbeat intervals counted in this loop's own running time (a
starved worker does not blame the broker for its own stall; see
``linkwatch.Liveness``). The worker then closes the socket, waits (0.5 s
doubling up to ``reconnect_max_s``, +-25% jitter; back to 0.5 s once a broker
was heard) and registers again on a fresh socket. Jobs still in the inference
threads from the old connection are answered into the void: the new broker
never gave them, so their replies are dropped here.

Stopping (SIGTERM, Ctrl-C, :meth:`Worker.stop`) drains: new JOBs are answered
BUSY "worker draining", the jobs in hand finish and their replies are sent,
then DISCONNECT, all within ``drain_grace_s``; jobs still unfinished then are
left for the broker to re-dispatch or expire.

Bounded memory. The socket sets ``ZMQ_IMMEDIATE`` (nothing is queued for a
broker that is not connected: such a reply is dropped and logged),
``ZMQ_MAXMSGSIZE`` = ``max_message_bytes`` per frame, and high-water marks of
``2 x capacity + 16`` messages each way. With at most ``2 x capacity`` jobs in
hand (more are answered BUSY; a broker that follows the protocol sends at most
``capacity``), a worker holds at most ``4 x capacity + 16`` JOBs, each of at
most 16 crops of at most ``max_message_bytes``: at the default capacity of 8
per thread, one thread and 64 KiB, 48 JOBs, 48 MiB in the very worst case and
1.8 MiB for 16-face JOBs of 48x48 crops (libzmq cannot cap the frame count of
one message; see docs/security.md).

Capacity. The worker announces its threads and a capacity of 8 JOBs per
thread unless told otherwise; the broker gives it only as many as its link
needs (two per thread on a LAN, more across a slow link: docs/protocol.md,
READY), so the spare capacity is room for a slow link, not a queue.

A malformed job is answered ERROR (with its id when it can be read) and the
worker carries on. Workers write nothing to disk.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import zmq

from .. import protocol as p
from .. import security, telemetry, transport
from ..config import WorkerSettings
from ..errors import ProtocolError, TransportError
from ..linkwatch import Backoff, Change, LinkWatch, Liveness, foreign_version
from ..model import DEFAULT_MODEL, load_card, resolve_model
from .inference import InferencePool
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

# Jobs in hand per announced credit, and extra messages (heartbeats, DISCONNECT) in a socket's queue.
IN_HAND_PER_CREDIT = 2
JOBS_PER_THREAD = 8  # default capacity: a link's round trip of up to ~7 JOBs' service time stays covered
SPARE_MESSAGES = 16
# How long closing a socket may wait to deliver the last replies and DISCONNECT.
CLOSE_LINGER_MS = 1000
POLL_MS = 100


class Worker:
    def __init__(self, settings: WorkerSettings, context: zmq.Context | None = None):
        self.settings = settings
        self.curve = security.client_security(settings, settings.broker)  # key problems fail start-up, here
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self.model_path = resolve_model(settings.model or DEFAULT_MODEL)
        self.card = load_card(self.model_path)
        self.capacity = min(1024, settings.capacity or JOBS_PER_THREAD * settings.threads)
        self.max_in_hand = IN_HAND_PER_CREDIT * self.capacity
        self.metrics = WorkerMetrics(self.name, self.card.model_id, settings.threads)
        self._results_endpoint = f"inproc://worker-results-{uuid.uuid4().hex}"
        self._results = self.ctx.socket(zmq.PULL)
        self._results.linger = 0
        self._results.bind(self._results_endpoint)
        info = self.model_info
        self.pool = InferencePool(self.ctx, self._results_endpoint, self.model_path, self.card, settings.threads,
                                  self.name, (info.width_px, info.height_px), settings.service_time_ms,
                                  echo=settings.echo, on_face=self.metrics.face)
        self.backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self._stop = threading.Event()
        self._sock: zmq.Socket | None = None
        self._watch: LinkWatch | None = None
        self.generation = 0
        self.registrations = 0
        self.jobs = 0
        self.in_hand = 0  # jobs given to the pool and not answered yet (any connection's)

    @property
    def model_info(self) -> p.ModelInfo:
        c = self.card
        # An echo worker may stand in for a model of another crop size (the broker-alone benchmark).
        width, height = ((self.settings.echo_crop_px,) * 2 if self.settings.echo_crop_px
                         else (c.preprocessing.width_px, c.preprocessing.height_px))
        return p.ModelInfo(name=c.name, version=c.version, input_shape=c.input_shape, labels=c.labels,
                           width_px=width, height_px=height, framing=c.framing)

    def stop(self) -> None:
        """Drain and stop: refuse new jobs, finish the ones in hand, leave (thread-safe)."""
        self._stop.set()

    # ----------------------------------------------------------------- connection

    def _open(self) -> None:
        self.generation += 1
        hwm = self.max_in_hand + SPARE_MESSAGES
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = True  # queue nothing for a broker we are not connected to
        sock.sndhwm = sock.rcvhwm = hwm
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.identity = f"{self.name}/{uuid.uuid4().hex[:8]}".encode()
        if self.curve:
            security.make_client(sock, *self.curve)
        watch = LinkWatch(sock, self.settings.broker, role="worker", curve=self.curve)
        try:
            sock.connect(self.settings.broker)
        except zmq.ZMQError as e:
            watch.close()
            sock.close()
            raise TransportError(f"cannot connect to {self.settings.broker}: {e.strerror}") from e
        self._sock, self._watch = sock, watch

    def _close(self) -> None:
        if self._sock is not None:
            self._watch.close()
            # A short linger lets the last replies and DISCONNECT out; IMMEDIATE means nothing
            # is queued when the broker is not there, so this never waits on a dead link.
            self._sock.close(CLOSE_LINGER_MS)
            self._sock = self._watch = None
        self.metrics.connected.set(0)

    def _register(self) -> bool:
        """Send READY; False if the socket would not take it now."""
        ready = p.Ready(worker=self.name, capacity=self.capacity, threads=min(self.settings.threads, self.capacity),
                        model=self.model_info)
        if not self._send(ready):
            return False
        self.registrations += 1
        self.metrics.registrations.inc()
        self.metrics.connected.set(1)
        log.info("worker %s registering with %s (capacity %d, model %s)", self.name, self.settings.broker,
                 self.capacity, self.card.model_id)
        return True

    def _send(self, msg: p.Message) -> bool:
        return transport.send_frames(self._sock, p.encode(msg))

    def _reply(self, frames: list[bytes]) -> None:
        """Send one job's reply (frames from ``p.encode``), counted by outcome."""
        if transport.send_frames(self._sock, frames):
            self.metrics.replied(frames[1])
        else:
            log.warning("reply dropped: no connection to the broker, or it is not reading")

    # ----------------------------------------------------------------- loop

    def serve(self) -> None:
        """Run until :meth:`stop` (then drain); reconnect whenever the broker goes away."""
        s = self.settings
        endpoint = None
        stopped = False
        try:  # a metrics port already taken fails here, and the finally still closes what __init__ opened
            endpoint = telemetry.serve(self.metrics.registry, s.metrics_port, s.metrics_host)
            self.pool.start()
            while not self._stop.is_set():
                self._open()
                try:
                    heard = self._session()
                finally:
                    self._close()
                if self._stop.is_set():
                    break
                if heard:
                    self.backoff.reset()
                delay = self.backoff.next()
                log.warning("reconnecting to %s in %.1f s", s.broker, delay)
                self._stop.wait(delay)
        finally:
            # After a drain the threads are idle; after a grace ran out one may be mid-face.
            stopped = self.pool.stop(timeout_s=1.0)
            self._results.close(0)
            if endpoint:
                endpoint.close()
            if self._own_context:
                if stopped:
                    self.ctx.term()
                else:  # a thread still holds its socket: term() would wait for it
                    log.warning("an inference thread is still busy; leaving without it")
            log.info("worker %s stopped after %d job(s)", self.name, self.jobs)

    def _session(self) -> bool:
        """Serve one connection until it is lost or the drain is done; return whether the broker was heard."""
        s = self.settings
        sock, watch = self._sock, self._watch
        poller = zmq.Poller()
        for each in (sock, self._results, watch.monitor):
            poller.register(each, zmq.POLLIN)
        interval = s.heartbeat_interval_s
        now = time.monotonic()
        liveness = Liveness(interval, s.liveness, now)
        next_beat = now + interval
        heard = False
        drain_until: float | None = None
        unregistered = False  # the link is up and READY has not gone out yet
        while True:
            if self._stop.is_set() and drain_until is None:
                drain_until = now + s.drain_grace_s
                log.info("worker %s draining: refusing new jobs, finishing %d in hand (up to %.1f s)",
                         self.name, self.in_hand, s.drain_grace_s)
            if drain_until is not None and (not self.in_hand or now >= drain_until or not watch.up):
                if self.in_hand:
                    log.warning("leaving with %d job(s) unfinished", self.in_hand)
                if watch.up:
                    self._send(p.Disconnect(reason="worker shutting down"))
                return heard
            events = dict(poller.poll(min(POLL_MS, interval * 1000)))
            now = time.monotonic()
            if watch.monitor in events:
                for change in watch.update():
                    if change is Change.UP:
                        liveness.heard(now)
                        unregistered = True
                    elif change is Change.LOST:
                        log.warning("connection to the broker at %s lost", s.broker)
                        return heard
                    else:
                        log.error("%s", watch.failure)
                        return heard
            if unregistered and watch.up and drain_until is None:
                unregistered = not self._register()  # tried again next turn if the socket would not take it
            if self._results in events:
                self._forward_results()
            if sock in events:
                for frames in transport.drain(sock, 256):
                    liveness.heard(now)
                    try:
                        keep = self._on_broker(frames, now, draining=drain_until is not None)
                    except TransportError:
                        raise
                    except Exception:  # a bug must cost one message, never the worker
                        log.exception("internal error handling a message from the broker; message dropped")
                        keep = True
                    if keep is None:
                        return heard
                    heard = heard or keep
            if liveness.tick(now):
                if heard:
                    log.warning("broker silent for %.1f s", liveness.silent_s)
                else:
                    log.warning("%s", watch.explain_silence(liveness.silent_s))
                return heard
            if now >= next_beat and watch.up:
                self._send(p.Heartbeat())
                next_beat = now + interval

    def _forward_results(self) -> None:
        current = self.generation.to_bytes(8, "big")
        for generation, *frames in transport.drain(self._results, 256):
            self.in_hand -= 1
            if generation == current:
                self._reply(frames)
        self.metrics.in_flight.set(self.in_hand)

    def _on_broker(self, frames: list[bytes], now: float, *, draining: bool) -> bool | None:
        """Handle one message from the broker: None when the connection must be dropped, else whether
        the message was the broker's (a message in another protocol version is not)."""
        try:
            msg = p.decode(frames, max_payload_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            theirs = foreign_version(frames)
            if theirs:
                log.error("the broker at %s speaks %s, this worker %s: install the same fer-swarm version on both",
                          self.settings.broker, theirs, p.PROTOCOL_TAG.decode())
                return None
            log.warning("malformed message from broker: %s", e)
            if getattr(e, "command", None) == p.Command.JOB:
                self._reply(p.encode(p.error_reply(p.Error, f"malformed job: {e}", ids=getattr(e, "ids", ()),
                                                   job=getattr(e, "job", None))))
            return True
        if isinstance(msg, p.Job):
            self._on_job(msg, now, draining)
        elif isinstance(msg, p.Disconnect):
            log.warning("broker says disconnect: %s", msg.reason or "(no reason)")
            return None
        elif isinstance(msg, p.Error):
            log.warning("the broker answered ERROR: %s", msg.reason)
        elif not isinstance(msg, p.Heartbeat):
            log.warning("unexpected %s from broker; ignored", msg.command.value)
        return True

    def _on_job(self, job: p.Job, now: float, draining: bool) -> None:
        self.jobs += 1
        if draining:
            self._reply(p.encode(p.Busy(ids=job.ids, job=job.job, reason="worker draining")))
            return
        if self.settings.echo and not self.settings.service_time_ms:
            # Free inference: answered here, so the figure is the broker's cost alone.
            self._reply(p.encode(self.pool.echo_result(job, 0.0)))
            return
        if self.in_hand >= self.max_in_hand or not self.pool.submit(self.generation, job, now):
            self._reply(p.encode(p.Busy(ids=job.ids, job=job.job, reason=f"worker {self.name} queue is full")))
            return
        self.in_hand += 1
        self.metrics.in_flight.set(self.in_hand)
