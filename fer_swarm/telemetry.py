"""Prometheus metrics: each running program keeps its own registry and serves it when asked.

A registry per instance (not the library's global one) keeps two brokers in
one test process, or a broker and its workers, from mixing their figures.
Names start with ``fer_swarm_``, carry their base unit (``_seconds``,
``_bytes``) and end in ``_total`` when they count; label values come from
small fixed sets (an outcome, a worker's name), never from a frame or a job.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

from .errors import TransportError

log = logging.getLogger(__name__)

# Histogram buckets for times a user feels, in seconds: 1 ms to 10 s.
TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MetricsEndpoint:
    """``http://HOST:PORT/metrics`` for one registry, on a daemon thread; :meth:`close` stops it."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise TransportError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        self.port = self._server.server_port
        self.host = host
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsEndpoint | None:
    """Serve ``registry`` on ``host:port``; None when ``port`` is 0 (metrics off)."""
    return MetricsEndpoint(registry, port, host) if port else None
