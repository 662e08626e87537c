"""The worker process: one I/O thread with one DEALER socket to the broker, and an inference pool.

Lifecycle, in the manner of the zguide's Paranoid Pirate worker:
connect, send READY (name, capacity, model), then serve JOBs and exchange
HEARTBEATs. If the broker says DISCONNECT, or is silent for ``liveness``
heartbeat intervals, the worker closes the socket, waits (0.5 s, doubling up
to ``reconnect_max_s``) and registers again on a fresh socket. Jobs still in
the inference threads from the old connection are answered into the void:
the new broker never gave them, so their replies are dropped here.

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
from .. import security, transport
from ..config import WorkerSettings
from ..errors import ProtocolError, TransportError
from ..model import DEFAULT_MODEL, load_card
from .inference import InferencePool

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: WorkerSettings, context: zmq.Context | None = None):
        self.settings = settings
        self.curve = security.client_security(settings, settings.broker)  # key problems fail start-up, here
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self.model_path = settings.model or DEFAULT_MODEL
        self.card = load_card(self.model_path)
        self.capacity = settings.capacity or 2 * settings.threads
        self._results_endpoint = f"inproc://worker-results-{uuid.uuid4().hex}"
        self._results = self.ctx.socket(zmq.PULL)
        self._results.linger = 0
        self._results.bind(self._results_endpoint)
        info = self.model_info
        self.pool = InferencePool(self.ctx, self._results_endpoint, self.model_path, self.card, settings.threads,
                                  self.name, (info.width_px, info.height_px), settings.service_time_ms,
                                  echo=settings.echo)
        self._stop = threading.Event()
        self._sock: zmq.Socket | None = None
        self.generation = 0
        self.registrations = 0
        self.jobs = 0

    @property
    def model_info(self) -> p.ModelInfo:
        c = self.card
        # An echo worker may stand in for a model of another crop size (the broker-alone benchmark).
        width, height = ((self.settings.echo_crop_px,) * 2 if self.settings.echo_crop_px
                         else (c.preprocessing.width_px, c.preprocessing.height_px))
        return p.ModelInfo(name=c.name, version=c.version, input_shape=c.input_shape, labels=c.labels,
                           width_px=width, height_px=height, framing=c.framing)

    def stop(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------- connection

    def _connect(self) -> None:
        self.generation += 1
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        sock.identity = f"{self.name}/{uuid.uuid4().hex[:8]}".encode()
        if self.curve:
            security.make_client(sock, *self.curve)
        try:
            sock.connect(self.settings.broker)
        except zmq.ZMQError as e:
            sock.close()
            raise TransportError(f"cannot connect to {self.settings.broker}: {e.strerror}") from e
        self._sock = sock
        self._send(p.Ready(worker=self.name, capacity=self.capacity, model=self.model_info))
        self.registrations += 1
        log.info("worker %s registering with %s (capacity %d, model %s)", self.name, self.settings.broker,
                 self.capacity, self.card.model_id)

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _send(self, msg: p.Message) -> None:
        self._send_frames(p.encode(msg))

    def _send_frames(self, frames: list[bytes]) -> None:
        if not transport.send_frames(self._sock, frames):
            log.warning("broker is not reading; message dropped")

    # ----------------------------------------------------------------- loop

    def serve(self) -> None:
        """Run until :meth:`stop`; reconnect whenever the broker goes away."""
        s = self.settings
        self.pool.start()
        backoff = s.reconnect_initial_s
        try:
            while not self._stop.is_set():
                self._connect()
                heard = self._session()
                self._disconnect()
                if self._stop.is_set():
                    break
                backoff = s.reconnect_initial_s if heard else min(backoff * 2, s.reconnect_max_s)
                log.warning("broker %s lost; reconnecting in %.1f s", s.broker, backoff)
                self._stop.wait(backoff)
        finally:
            if self._sock is not None:
                try:
                    self._send(p.Disconnect(reason="worker shutting down"))
                except TransportError:
                    pass
            self._disconnect()
            self.pool.stop()
            self._results.close(0)
            if self._own_context:
                self.ctx.term()
            log.info("worker %s stopped after %d job(s)", self.name, self.jobs)

    def _session(self) -> bool:
        """Serve one connection until the broker is lost; return whether it was ever heard from."""
        s = self.settings
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._results, zmq.POLLIN)
        interval = s.heartbeat_interval_s
        last_heard = time.monotonic()
        next_beat = last_heard + interval
        heard = False
        while not self._stop.is_set():
            events = dict(poller.poll(min(100, interval * 1000)))
            now = time.monotonic()
            if self._results in events:
                self._forward_results()
            if self._sock in events:
                for frames in transport.drain(self._sock, 256):
                    heard = True
                    last_heard = now
                    try:
                        keep = self._on_broker(frames, now)
                    except TransportError:
                        raise
                    except Exception:  # a bug must cost one message, never the worker
                        log.exception("internal error handling a message from the broker; message dropped")
                        keep = True
                    if not keep:
                        return heard
            if now - last_heard > interval * s.liveness:
                log.warning("broker silent for %.1f s", now - last_heard)
                return heard
            if now >= next_beat:
                self._send(p.Heartbeat())
                next_beat = now + interval
        return heard

    def _forward_results(self) -> None:
        current = self.generation.to_bytes(8, "big")
        for generation, *frames in transport.drain(self._results, 256):
            if generation == current:
                self._send_frames(frames)

    def _on_broker(self, frames: list[bytes], now: float) -> bool:
        """Handle one message from the broker; False when the connection must be dropped."""
        try:
            msg = p.decode(frames, max_payload_bytes=self.settings.max_message_bytes)
        except ProtocolError as e:
            log.warning("malformed message from broker: %s", e)
            if getattr(e, "command", None) == p.Command.JOB:
                self._send(p.error_reply(p.Error, f"malformed job: {e}", ids=getattr(e, "ids", ()), job=getattr(e, "job", None)))
            return True
        if isinstance(msg, p.Job):
            self.jobs += 1
            if self.settings.echo and not self.settings.service_time_ms:
                # Free inference: answered here, so the figure is the broker's cost alone.
                self._send_frames(p.encode(self.pool.echo_result(msg, 0.0)))
                return True
            if not self.pool.submit(self.generation, msg, now):
                self._send(p.Busy(ids=msg.ids, job=msg.job, reason=f"worker {self.name} queue is full"))
        elif isinstance(msg, p.Disconnect):
            log.warning("broker says disconnect: %s", msg.reason or "(no reason)")
            return False
        elif not isinstance(msg, p.Heartbeat):
            log.warning("unexpected %s from broker; ignored", msg.command.value)
        return True
