"""Inference threads: each owns one interpreter (interpreters are not thread-safe) and one PUSH socket.

The I/O thread puts jobs on a bounded queue; a thread takes one, checks its
deadline, runs the model and pushes the encoded reply back over ``inproc://``
to the I/O thread, the only one that touches the broker's socket. Encoding
the reply here keeps that work off the I/O thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from .. import protocol as p
from ..errors import ModelError
from ..model import Classifier, ModelCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    generation: int  # which broker connection the job came on; replies to an older one are dropped
    msg: p.Job
    received: float  # monotonic seconds


class InferencePool:
    def __init__(self, ctx: zmq.Context, results_endpoint: str, model_path, card: ModelCard, threads: int,
                 worker_name: str, service_time_ms: float = 0.0, *, echo: bool = False):
        self.card = card
        self.service_time_s = service_time_ms / 1000
        self.echo = echo
        self.worker_name = worker_name
        self.tasks: queue.Queue[Task | None] = queue.Queue(maxsize=1024)
        self._ctx = ctx
        self._endpoint = results_endpoint
        # Load every interpreter before starting: a model that cannot load fails start-up, not job one.
        self._classifiers = [Classifier(model_path, threads=1, card=card) for _ in range(threads)]
        for clf in self._classifiers:  # the first invoke sets up kernels: pay it now, not on a client's first face
            clf.predict(np.zeros(clf.crop_size[::-1], np.uint8))
        self._threads = [
            threading.Thread(target=self._run, args=(clf,), name=f"inference-{i}", daemon=True)
            for i, clf in enumerate(self._classifiers)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for _ in self._threads:
            self.tasks.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def _run(self, clf: Classifier) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(self._endpoint)
        try:
            while (task := self.tasks.get()) is not None:
                reply = self._answer(clf, task)
                # inproc PUSH to our own I/O thread: never full for long, so blocking here is fine.
                push.send_multipart([task.generation.to_bytes(8, "big"), *p.encode(reply)], copy=True)
        finally:
            push.close()

    def echo_result(self, job: p.Job, ms: float) -> p.Result:
        """The fixed answer of an echo worker (benchmarks): first label, certain."""
        labels = self.card.labels
        probs = {label: (1.0 if i == 0 else 0.0) for i, label in enumerate(labels)}
        return p.Result(id=job.id, job=job.job, label=labels[0], probabilities=probs, model=self.card.model_id,
                        worker=self.worker_name, inference_ms=round(ms, 3))

    def _answer(self, clf: Classifier, task: Task) -> p.Message:
        job = task.msg
        waited_ms = (time.monotonic() - task.received) * 1000
        if waited_ms >= job.deadline_ms:
            return p.Expired(id=job.id, job=job.job, reason=f"deadline passed after {waited_ms:.0f} ms in the worker's queue")
        want = clf.crop_size
        if (job.width_px, job.height_px) != want:
            return p.Error(id=job.id, job=job.job,
                           reason=f"crop is {job.width_px}x{job.height_px}, model {self.card.model_id} takes {want[0]}x{want[1]}")
        if self.echo:  # a simulated device: a fixed service time, no model run on this machine's CPU
            time.sleep(self.service_time_s)
            return self.echo_result(job, self.service_time_s * 1000)
        try:
            t0 = time.perf_counter()
            probs = clf.predict(np.frombuffer(job.payload, dtype=np.uint8))
            if self.service_time_s:
                time.sleep(max(0.0, t0 + self.service_time_s - time.perf_counter()))
            ms = (time.perf_counter() - t0) * 1000
        except (ModelError, ValueError) as e:
            return p.Error(id=job.id, job=job.job, reason=f"inference failed: {e}")
        labels = clf.labels
        return p.Result(
            id=job.id, job=job.job, label=labels[int(np.argmax(probs))],
            probabilities={label: round(float(v), 5) for label, v in zip(labels, probs)},
            model=self.card.model_id, worker=self.worker_name, inference_ms=round(ms, 3),
        )
