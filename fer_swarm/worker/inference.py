"""Inference threads: each owns one interpreter (interpreters are not thread-safe) and one PUSH socket.

The I/O thread hands each JOB to :meth:`InferencePool.submit`, which splits
its crops into as many parts as there are threads (a frame's four faces run
on a 4-thread Pi at once, not one after another) and queues the parts on a
bounded queue. A thread takes a part, checks the deadline and the crop size,
runs the model on each crop of its part and, if it finished the JOB's last
part, encodes the one reply for the whole JOB and pushes it over
``inproc://`` to the I/O thread, the only one that touches the broker's
socket. Encoding here keeps that work off the I/O thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from .. import protocol as p
from ..errors import ModelError, ProtocolError
from ..model import Classifier, ModelCard

log = logging.getLogger(__name__)

MAX_QUEUED_PARTS = 1024


@dataclass(eq=False)
class _Answer:
    """One JOB on its way through the threads; the thread that finishes its last part sends the reply."""

    generation: int  # which broker connection the job came on; replies to an older one are dropped
    msg: p.Job
    received: float  # monotonic seconds
    parts: int  # parts not finished yet
    faces: list[p.FaceResult | None]
    failure: p.Message | None = None  # EXPIRED or ERROR for the whole JOB
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Task:
    answer: _Answer
    start: int  # the part is crops [start, stop) of the JOB
    stop: int


class InferencePool:
    def __init__(self, ctx: zmq.Context, results_endpoint: str, model_path, card: ModelCard, threads: int,
                 worker_name: str, crop_size: tuple[int, int], service_time_ms: float = 0.0, *, echo: bool = False,
                 on_face: Callable[[float], None] | None = None):
        self.card = card
        self.on_face = on_face  # called from the inference threads with each face's seconds
        self.crop_size = crop_size  # (width, height) the worker announced: JOBs of another size are refused
        self.service_time_s = service_time_ms / 1000
        self.echo = echo
        self.worker_name = worker_name
        self.tasks: queue.Queue[Task | None] = queue.Queue(maxsize=MAX_QUEUED_PARTS)
        self._ctx = ctx
        self._endpoint = results_endpoint
        self._stopping = False
        # Load every interpreter before starting: a model that cannot load fails start-up, not job one.
        self._classifiers = [Classifier(model_path, threads=1, card=card) for _ in range(threads)]
        for clf in self._classifiers:  # the first invoke sets up kernels: pay it now, not on a client's first face
            clf.predict(np.zeros(clf.crop_size[::-1], np.uint8))
        self._threads = [
            threading.Thread(target=self._run, args=(clf,), name=f"inference-{i}", daemon=True)
            for i, clf in enumerate(self._classifiers)
        ]

    def submit(self, generation: int, job: p.Job, received: float) -> bool:
        """Queue ``job``'s crops, split across the threads; False (nothing queued) when the queue is full.

        Only the I/O thread calls this, so the room checked here is still there when the parts go in.
        """
        n = len(job.ids)
        parts = min(n, len(self._threads))
        if self.tasks.qsize() + parts > MAX_QUEUED_PARTS:
            return False
        answer = _Answer(generation, job, received, parts, [None] * n)
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            self.tasks.put_nowait(Task(answer, start, stop))
        return True

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the threads, dropping the parts still queued; True if all ended within ``timeout_s``.

        A thread in the middle of a part finishes it first (a model call cannot be interrupted).
        """
        self._stopping = True
        for _ in self._threads:
            try:
                self.tasks.put_nowait(None)
            except queue.Full:  # the threads see _stopping at their next part
                break
        end = time.monotonic() + timeout_s
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self, clf: Classifier) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(self._endpoint)
        try:
            while (task := self.tasks.get()) is not None and not self._stopping:
                try:
                    frames = self._run_part(clf, task)
                except Exception:  # a bug must cost one reply, never the thread
                    log.exception("internal error in an inference thread")
                    continue
                if frames:
                    # inproc PUSH to our own I/O thread: never full for long, so blocking here is fine.
                    try:
                        push.send_multipart([task.answer.generation.to_bytes(8, "big"), *frames], copy=True)
                    except zmq.ZMQError:  # the worker left without us (its drain ran out of time)
                        return
        finally:
            push.close()

    def echo_result(self, job: p.Job, ms: float) -> p.Result:
        """The fixed answer of an echo worker (benchmarks): first label, certain, for every crop."""
        faces = tuple(self._echo_face(id, ms) for id in job.ids)
        return p.Result(job=job.job, model=self.card.model_id, worker=self.worker_name, faces=faces)

    def _echo_face(self, id: p.CorrelationId, ms: float) -> p.FaceResult:
        labels = self.card.labels
        return p.FaceResult(id=id, label=labels[0], inference_ms=round(ms, 3),
                            probabilities={label: (1.0 if i == 0 else 0.0) for i, label in enumerate(labels)})

    def _run_part(self, clf: Classifier, task: Task) -> list[bytes] | None:
        """Run one part; the frames of the JOB's reply if this was its last part to finish, else None.

        Whatever fails here, the part is counted done, so the JOB still gets its one reply.
        """
        answer = task.answer
        faces: list[p.FaceResult] = []
        try:
            failure = answer.failure or self._refusal(answer)  # another part's failure spares this work
            if failure is None:
                faces = [self._classify(clf, answer.msg.ids[i], answer.msg.payloads[i])
                         for i in range(task.start, task.stop)]
        except Exception as e:
            if not isinstance(e, (ModelError, ValueError)):
                log.exception("inference failed on job %s", answer.msg.job)
            failure = p.error_reply(p.Error, f"inference failed: {e}", ids=answer.msg.ids, job=answer.msg.job)
        with answer.lock:
            if failure is not None:
                answer.failure = answer.failure or failure
            else:
                answer.faces[task.start:task.stop] = faces
            answer.parts -= 1
            if answer.parts:
                return None
        return self._reply(answer)

    def _reply(self, answer: _Answer) -> list[bytes]:
        """The frames of a finished JOB's one reply."""
        job = answer.msg
        try:
            return p.encode(answer.failure or p.Result(job=job.job, model=self.card.model_id,
                                                       worker=self.worker_name, faces=tuple(answer.faces)))
        except (ProtocolError, ValueError) as e:  # e.g. a model whose labels make the header too long
            log.exception("reply to job %s cannot be sent", job.job)
            return p.encode(p.error_reply(p.Error, f"result cannot be sent: {e}", ids=job.ids, job=job.job))

    def _refusal(self, answer: _Answer) -> p.Message | None:
        """EXPIRED or ERROR for a JOB that must not run: past its deadline, or crops of the size not announced."""
        job = answer.msg
        waited_ms = (time.monotonic() - answer.received) * 1000
        if waited_ms >= job.deadline_ms:
            return p.Expired(ids=job.ids, job=job.job,
                             reason=f"deadline passed after {waited_ms:.0f} ms in the worker's queue")
        want = self.crop_size
        if (job.width_px, job.height_px) != want:
            return p.Error(ids=job.ids, job=job.job,
                           reason=f"crop is {job.width_px}x{job.height_px}, model {self.card.model_id} takes {want[0]}x{want[1]}")
        return None

    def _classify(self, clf: Classifier, id: p.CorrelationId, crop: bytes) -> p.FaceResult:
        labels = clf.labels
        t0 = time.perf_counter()
        if self.echo:  # a simulated device: a fixed service time, no model run on this machine's CPU
            time.sleep(self.service_time_s)
            face = self._echo_face(id, self.service_time_s * 1000)
        else:
            probs = clf.predict(np.frombuffer(crop, dtype=np.uint8))
            if self.service_time_s:
                time.sleep(max(0.0, t0 + self.service_time_s - time.perf_counter()))
            face = p.FaceResult(id=id, label=labels[int(np.argmax(probs))],
                                probabilities={label: round(float(v), 5) for label, v in zip(labels, probs)},
                                inference_ms=round((time.perf_counter() - t0) * 1000, 3))
        if self.on_face:
            self.on_face(time.perf_counter() - t0)
        return face
