"""The worker's Prometheus metrics (names agreed across the project; served with ``--metrics-port``).

One registry per Worker (see ``fer_swarm.telemetry``). The I/O thread counts
jobs, connection and registrations; the inference threads count faces and
time them (prometheus_client's metrics are thread-safe).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..telemetry import TIME_BUCKETS_S

# A reply's command frame -> its outcome label. EXPIRED is the worker's too: a job whose
# deadline passed while it waited for a thread.
OUTCOMES = {b"RESULT": "result", b"BUSY": "busy", b"ERROR": "error", b"EXPIRED": "expired"}


class WorkerMetrics:
    def __init__(self, name: str, model_id: str, threads: int):
        self.registry = r = CollectorRegistry()
        self.jobs = Counter("fer_swarm_worker_jobs", "Jobs answered, by the reply sent.", ["outcome"], registry=r)
        for outcome in OUTCOMES.values():
            self.jobs.labels(outcome)  # every outcome present from the start, at 0
        self.faces = Counter("fer_swarm_worker_faces", "Face crops classified.", registry=r)
        self.inference = Histogram("fer_swarm_worker_inference_seconds", "Model time per face crop.",
                                   buckets=TIME_BUCKETS_S, registry=r)
        self.in_flight = Gauge("fer_swarm_worker_jobs_in_flight", "Jobs taken and not yet answered.", registry=r)
        self.connected = Gauge("fer_swarm_worker_connected", "1 while the link to the broker is up.", registry=r)
        self.registrations = Counter("fer_swarm_worker_registrations", "READY messages sent to a broker.", registry=r)
        Gauge("fer_swarm_worker_threads", "Inference threads.", registry=r).set(threads)
        Gauge("fer_swarm_worker_info", "This worker's name and model (value 1).", ["model", "name"],
              registry=r).labels(model_id, name).set(1)

    def replied(self, command: bytes) -> None:
        """Count one reply by its command frame."""
        outcome = OUTCOMES.get(bytes(command))
        if outcome:
            self.jobs.labels(outcome).inc()

    def face(self, seconds: float) -> None:
        self.faces.inc()
        self.inference.observe(seconds)
