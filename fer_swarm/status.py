"""``fer-swarm status``: ask a broker how it is doing (STATUS -> REPORT) and show the answer.

The request goes to the broker's frontend like any client's, with the same
keys, so an operator needs nothing a headset does not already have. The
report's fields are listed in docs/protocol.md; this module fetches one and
renders it as tables, as one JSON object, or as the one line a health probe
(systemd, Docker, Kubernetes) wants.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq
from rich.console import Group
from rich.table import Table

from . import protocol as p
from . import security
from .config import StatusSettings
from .errors import FerSwarmError, ProtocolError, TransportError
from .linkwatch import LinkWatch, foreign_version


class StatusClient:
    """One DEALER to the broker's frontend, kept open between requests (a live table asks every second)."""

    def __init__(self, settings: StatusSettings, context: zmq.Context | None = None):
        self.settings = settings
        self.endpoint = settings.broker
        curve = security.client_security(settings, settings.broker)
        self._own_context = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_REPORT_BYTES + p.MAX_HEADER_BYTES)
        self.sock.identity = f"status/{uuid.uuid4().hex[:8]}".encode()
        # The handshake's failures (key refused, wrong broker key, no encryption) are told by the monitor.
        self.watch = LinkWatch(self.sock, self.endpoint, role="client", curve=curve)
        try:
            if curve:
                security.make_client(self.sock, *curve)
            self.sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise TransportError(f"cannot connect to {self.endpoint}: {e.strerror}") from e

    def fetch(self) -> dict[str, Any]:
        """One status report; TransportError when no answer comes within the timeout."""
        self.sock.send_multipart(p.encode(p.Status()))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        deadline = time.monotonic() + self.settings.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(int(left * 1000) + 1))
            if self.watch.monitor in events:
                self.watch.update()
                if self.watch.failure:
                    raise TransportError(self.watch.failure)
            if self.sock not in events:
                continue
            frames = self.sock.recv_multipart()
            if (other := foreign_version(frames)) is not None:
                raise TransportError(f"the broker at {self.endpoint} speaks {other}, this tool "
                                     f"{p.PROTOCOL_TAG.decode()}: install the same fer-swarm version on both")
            try:
                msg = p.decode(frames)
            except ProtocolError as e:
                raise TransportError(f"the broker at {self.endpoint} answered with a message this tool cannot "
                                     f"read: {e}") from None
            if isinstance(msg, p.Report):
                try:
                    return msg.status
                except ValueError as e:
                    raise TransportError(f"the broker's report is not a JSON object: {e}") from None
            if isinstance(msg, p.Error):  # e.g. a broker of another protocol version
                raise TransportError(f"the broker at {self.endpoint} refused the request: {msg.reason}")
        raise TransportError(self.watch.explain_silence(self.settings.timeout_s))

    def close(self) -> None:
        self.watch.close()
        self.sock.close(0)
        if self._own_context:
            self.ctx.term()

    def __enter__(self) -> StatusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_line(report: dict[str, Any], endpoint: str) -> tuple[bool, str]:
    """(healthy, one line) for ``--check``: healthy when the broker answers and has a worker."""
    workers = report["workers"]
    broker = report["broker"]
    if broker.get("draining"):
        return False, f"broker at {endpoint} is shutting down"
    if not workers:
        return False, f"broker at {endpoint} answers, but no worker is registered"
    threads = sum(w["concurrency"] for w in workers)
    return True, (f"ok: broker at {endpoint} answers; {len(workers)} worker(s), {threads} at once, "
                  f"model {broker['model']}, {report['queue']['jobs']} job(s) queued")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def render(report: dict[str, Any], endpoint: str) -> Group:
    """The report as rich tables: the broker, its workers, its clients."""
    b, q, c, lat = report["broker"], report["queue"], report["counters"], report["latency_ms"]
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]broker[/] {endpoint}", f"up {b['uptime_s']:.0f} s", f"model {b['model'] or '-'}",
        "[yellow]draining[/]" if b["draining"] else "serving",
    )
    head.add_row(
        f"queue {q['jobs']}/{q['max_jobs']} jobs, {q['bytes'] / 1024:.0f}/{q['max_bytes'] / 1024:.0f} KB",
        f"in flight {q['in_flight']}/{q['credits']} credits",
        f"jobs {c['received']} in: {c['results']} results, {c['expired']} expired, {c['busy']} busy, "
        f"{c['errors']} errors",
        f"dropped replies: {c['late_results']} late, {c['wrong_replies']} wrong",
    )
    head.add_row(
        f"latency ms (last {lat['jobs']} jobs)",
        "queue p50/p90/p99 " + "/".join(_ms(lat["queue"][k]) for k in ("p50", "p90", "p99")),
        "compute " + "/".join(_ms(lat["compute"][k]) for k in ("p50", "p90", "p99")),
        "total " + "/".join(_ms(lat["total"][k]) for k in ("p50", "p90", "p99")),
    )
    workers = Table(title=f"{len(report['workers'])} worker(s)", title_justify="left")
    for col in ("name", "host", "model", "capacity", "credits", "in flight", "done", "failed", "link ms",
                "service ms", "heartbeat age s"):
        workers.add_column(col, justify="left" if col in ("name", "host", "model") else "right", no_wrap=True)
    for w in report["workers"]:
        workers.add_row(w["name"], w["host"] or "-", w["model"], str(w["capacity"]), str(w["credits"]),
                        str(w["in_flight"]), str(w["done"]), str(w["failed"]), _ms(w["link_ms"]),
                        _ms(w["service_ms"]), f"{w['heartbeat_age_s']:.1f}")
    clients = Table(title=f"{len(report['clients'])} client(s)", title_justify="left")
    for col in ("stream", "host", "jobs/s", "received", "queued", "in flight", "results", "busy", "expired",
                "errors"):
        clients.add_column(col, justify="left" if col in ("stream", "host") else "right", no_wrap=True)
    for k in report["clients"]:
        clients.add_row(k["stream"] or "-", k["host"] or "-", f"{k['jobs_per_s']:.1f}", str(k["received"]),
                        str(k["queued"]), str(k["in_flight"]), str(k["results"]), str(k["busy"]),
                        str(k["expired"]), str(k["errors"]))
    return Group(head, workers, clients)


def require(report: dict[str, Any]) -> dict[str, Any]:
    """The report, checked for the fields this tool reads (a clear error instead of a KeyError)."""
    missing = [k for k in ("broker", "workers", "clients", "queue", "counters", "latency_ms") if k not in report]
    if missing:
        raise FerSwarmError(f"the broker's report lacks {', '.join(missing)}: is it another fer-swarm version?")
    return report
