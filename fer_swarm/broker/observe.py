"""What the broker shows its operators: the status report (STATUS -> REPORT) and Prometheus metrics.

Both read the scheduler's state. The report is built in the broker's own
thread when a STATUS arrives. The metrics endpoint is scraped from another
thread, so it reads only figures the broker thread publishes whole
(:meth:`BrokerMetrics.publish`, a few times a second) and plain counters;
times are observed as each job is answered.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import __version__
from .. import protocol as p
from ..config import BrokerSettings
from ..telemetry import TIME_BUCKETS_S
from .scheduler import PendingJob, Scheduler

PERCENTILES = (50, 90, 99)


def _percentiles_ms(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank percentiles in ms (the broker does without numpy: it imports no numerics at all)."""
    ranked = sorted(values)
    return {f"p{q}": round(1000 * ranked[max(0, math.ceil(q * len(ranked) / 100) - 1)], 2) if ranked else None
            for q in PERCENTILES}


def status_report(scheduler: Scheduler, settings: BrokerSettings, *, started: float, draining: bool,
                  now: float | None = None) -> dict[str, Any]:
    """The broker's status as the JSON object REPORT carries (docs/protocol.md lists the fields)."""
    now = time.monotonic() if now is None else now
    s = scheduler
    workers = [{
        "id": w.identity.hex(),
        "name": w.name,
        "host": w.peer,
        "model": w.model.ref,
        "capacity": w.capacity,
        "concurrency": w.concurrency,
        "credits": w.credits,
        "in_flight": len(w.inflight),
        "done": w.done,
        "failed": w.failed,
        "wrong_replies": w.wrong_replies,
        "link_ms": None if w.link_s is None else round(w.link_s * 1000, 2),
        "service_ms": None if w.service_s is None else round(w.service_s * 1000, 3),
        "heartbeat_age_s": round(now - w.last_seen, 3),
        "joined_s_ago": round(now - w.joined, 1),
    } for w in s.workers.values()]
    clients = [{
        "id": c.identity.hex(),
        "host": c.peer,
        "stream": c.stream,
        "jobs_per_s": round(c.rate(now), 1),
        "received": c.received,
        "queued": len(c.queue),
        "queued_bytes": c.queued_bytes,
        "in_flight": c.inflight,
        "results": c.outcomes.get("RESULT", 0),
        "busy": c.outcomes.get("BUSY", 0),
        "expired": c.outcomes.get("EXPIRED", 0),
        "errors": c.outcomes.get("ERROR", 0),
        "last_seen_s_ago": round(now - c.last_seen, 3),
    } for c in s.clients.values()]
    timings = list(s.timings)
    return {
        "broker": {
            "version": __version__,
            "protocol": p.PROTOCOL_TAG.decode(),
            "uptime_s": round(now - started, 1),
            "draining": draining,
            "model": None if s.pool_model() is None else s.pool_model().ref,
            "heartbeat_interval_s": settings.heartbeat_interval_s,
        },
        "workers": workers,
        "clients": clients,
        "queue": {
            "jobs": s.queued,
            "bytes": s.queued_bytes,
            "max_jobs": settings.max_queue,
            "max_bytes": settings.max_queue_bytes,
            "in_flight": s.inflight,
            "credits": sum(w.credits for w in s.workers.values()),
        },
        "counters": vars(s.counters).copy(),
        "latency_ms": {
            "jobs": len(timings),
            "queue": _percentiles_ms([t.queue_s for t in timings]),
            "compute": _percentiles_ms([t.compute_s for t in timings]),
            "total": _percentiles_ms([t.total_s for t in timings]),
        },
    }


class BrokerMetrics:
    """The broker's Prometheus metrics, in a registry of its own (``self.registry``)."""

    OUTCOMES = {"results": "result", "expired": "expired", "busy": "busy", "errors": "error"}

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.registry = CollectorRegistry()
        self._gauges: dict[str, float] = {}
        self.draining = False
        self.registry.register(self)
        kw = dict(buckets=TIME_BUCKETS_S, registry=self.registry)
        self.queue_time = Histogram("fer_swarm_broker_queue_seconds",
                                    "Time a job waited in the broker's queue before dispatch.", **kw)
        self.compute_time = Histogram("fer_swarm_broker_compute_seconds",
                                      "Time from dispatch to the worker's answer: link round trip and the worker.", **kw)
        self.job_time = Histogram("fer_swarm_broker_job_seconds",
                                  "Time from a job's receipt to its RESULT at the broker.", **kw)
        self.publish()

    def answered(self, job: PendingJob, now: float) -> None:
        self.queue_time.observe(job.dispatched - job.received)
        self.compute_time.observe(now - job.dispatched)
        self.job_time.observe(now - job.received)

    def publish(self) -> None:
        """Called in the broker's thread: the gauges the scrape thread will read."""
        s = self.scheduler
        self._gauges = {
            "queue_jobs": s.queued,
            "queue_bytes": s.queued_bytes,
            "workers": len(s.workers),
            "clients": len(s.clients),
            "credits": sum(w.credits for w in s.workers.values()),
            "credits_in_use": s.inflight,
            "draining": int(self.draining),
        }

    def describe(self):
        return []  # collected at scrape time; nothing to check at registration

    def collect(self):
        g = self._gauges
        helps = {
            "queue_jobs": "Jobs waiting in the broker's queue.",
            "queue_bytes": "Bytes of pixels waiting in the broker's queue.",
            "workers": "Workers registered.",
            "clients": "Clients the broker keeps state for.",
            "credits": "Jobs the registered workers may hold at once, in all.",
            "credits_in_use": "Jobs at workers now.",
            "draining": "1 while the broker is shutting down and refusing new jobs.",
        }
        for name, help_text in helps.items():
            yield GaugeMetricFamily(f"fer_swarm_broker_{name}", help_text, value=g.get(name, 0))
        c = self.scheduler.counters
        yield CounterMetricFamily("fer_swarm_broker_jobs_received", "Jobs received from clients.", value=c.received)
        jobs = CounterMetricFamily("fer_swarm_broker_jobs", "Jobs answered, by outcome.", labels=["outcome"])
        for field, outcome in self.OUTCOMES.items():
            jobs.add_metric([outcome], getattr(c, field))
        yield jobs
        dropped = CounterMetricFamily("fer_swarm_broker_replies_dropped", "Worker replies not forwarded, by reason.",
                                      labels=["reason"])
        dropped.add_metric(["late"], c.late_results)
        dropped.add_metric(["wrong_ids"], c.wrong_replies)
        yield dropped
        yield CounterMetricFamily("fer_swarm_broker_workers_lost", "Workers lost (gone, silent or disconnected).",
                                  value=c.workers_lost)
        yield CounterMetricFamily("fer_swarm_broker_jobs_redispatched",
                                  "Jobs sent again after their worker was lost.", value=c.redispatched)
