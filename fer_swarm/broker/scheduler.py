"""The broker's bookkeeping and rules, with no sockets: what to send where, and why.

The server (:mod:`fer_swarm.broker.server`) feeds it what arrives and sends
what it returns. Keeping the rules here makes each one testable alone:

- Credits: a worker never holds more jobs than its credits, and never more
  than the capacity it announced. A job is one JOB message (the crops of one
  frame, usually): credits count messages. A worker's credits cover its
  link: enough jobs to keep each of its threads busy while others cross the
  network (the bandwidth-delay product), from its measured round trip and
  service time; at least two per thread, as on a fast link.
  The least-loaded worker (lowest share of its credits in use) goes first, so
  a 4-thread Pi and a 1-thread laptop fill in proportion.
- Deadlines: a job past its deadline is answered EXPIRED, whether it is still
  queued or already at a worker (whose late answer is then dropped). A job is
  not dispatched to a worker that cannot answer it in time, given that
  worker's round trip, service time and jobs ahead of it: if no worker with
  free credit can, it is answered EXPIRED at once.
- Verified replies: a worker's reply is forwarded only if it names a job in
  flight at that worker and exactly that job's ids; anything else is dropped
  and counted, and the server disconnects a worker that keeps doing it.
- Fairness: each client has its own queue and dispatch takes one job per
  client in turn, so a client flooding the broker only delays itself. When
  the shared queue is full, a client under its fair share still gets in: the
  newest job of the client holding the most is answered BUSY to make room.
- Lost workers: their unanswered jobs go back to the front of their client's
  queue once, if enough of the deadline remains; otherwise ERROR.
- Draining: while the broker shuts down, new jobs are answered BUSY; what is
  queued or in flight is answered by :meth:`abandon` when time runs out.
- Bounds: total and per-client queue lengths and bytes of pixels (BUSY
  beyond them), the client table (clients with nothing pending are forgotten
  first) and the worker table. Crops of another size than the pool's model
  are answered ERROR instead of being queued or dispatched.

The invariant everything here serves: every job gets exactly one terminal
reply (RESULT, EXPIRED, BUSY or ERROR) while its client is known. ``answered``
on a job is the single flag that enforces "exactly one".
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from .. import protocol as p
from ..config import BrokerSettings

log = logging.getLogger(__name__)

Reply = tuple[bytes, p.Message]  # (client identity, message to send it)

LINK_SAMPLES = 32  # recent jobs whose round trip the link estimate is the least of
SERVICE_EWMA = 0.2  # weight of the newest job in a worker's service-time estimate
MIN_SERVICE_S = 1e-4  # floor of the service-time estimate (an echo worker answers in ~0 s)
LATENCY_SAMPLES = 2048  # recent answered jobs kept for the status report's percentiles
RATE_WINDOW_S = 5.0  # a client's jobs/s is counted over windows of this length
MAX_WRONG_REPLIES = 3  # replies not matching their job before a worker is disconnected


@dataclass(eq=False)
class PendingJob:
    job: int
    client: bytes
    owner: ClientState  # the client state it was queued under: a client forgotten and back is a new one
    msg: p.Job
    received: float  # monotonic seconds
    deadline: float
    size: int  # bytes of pixels it holds
    attempts: int = 0
    answered: bool = False
    dispatched: float = 0.0

    def remaining_ms(self, now: float) -> int:
        return int((self.deadline - now) * 1000)

    def keys(self) -> set[tuple[str, int, int]]:
        return {i.key() for i in self.msg.ids}


@dataclass(eq=False)
class WorkerState:
    identity: bytes
    name: str
    capacity: int  # jobs it announced it can hold
    concurrency: int  # jobs it works on at once (its threads)
    model: p.ModelInfo
    last_seen: float
    joined: float
    peer: str = ""
    inflight: dict[int, PendingJob] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    wrong_replies: int = 0
    paused_until: float = 0.0  # it answered BUSY: no jobs before then
    face_s: float | None = None  # smoothed seconds one of its threads takes for one face
    faces_per_job: float = 1.0  # smoothed size of the jobs it gets, in faces
    _links: deque[float] = field(default_factory=lambda: deque(maxlen=LINK_SAMPLES))

    @property
    def link_s(self) -> float | None:
        """The round trip of its link: the least of recent jobs' time away less their service time
        (the least, because only a job that found the worker idle did not also wait in its queue)."""
        return min(self._links) if self._links else None

    @property
    def service_s(self) -> float | None:
        """Seconds of its time a typical job takes when all its threads are busy (jobs leave at 1/this per s)."""
        return None if self.face_s is None else self.face_s * self.faces_per_job / self.concurrency

    @property
    def credits(self) -> int:
        """Jobs it may hold: one per thread running, plus what it finishes while a reply and the next job
        cross the link (round trip / service time: the bandwidth-delay product); at least two per
        thread, as on a fast link; never more than its capacity."""
        fast_link = 2 * self.concurrency
        link, service = self.link_s, self.service_s
        if link is None or service is None:
            return min(self.capacity, fast_link)
        need = self.concurrency + math.ceil(link / max(service, MIN_SERVICE_S))
        return min(self.capacity, max(fast_link, need))

    @property
    def load(self) -> float:
        return len(self.inflight) / self.credits

    def expected_s(self, faces: int) -> float:
        """Seconds a job of ``faces`` crops would take to come back: the link, the faces it holds ahead of
        the job shared among its threads, then the job's own faces split across them."""
        if self.face_s is None:
            return self.link_s or 0.0
        ahead = sum(len(job.msg.ids) for job in self.inflight.values())
        own = math.ceil(faces / self.concurrency)
        return (self.link_s or 0.0) + (ahead / self.concurrency + own) * self.face_s

    def measured(self, away_s: float, inference_s: float, faces: int) -> None:
        """A job came back ``away_s`` after dispatch, its ``faces`` crops having taken ``inference_s`` in all.

        Time is counted per face, not per job: a one-face job is not to be judged by the size of the
        sixteen-face jobs before it.
        """
        running_s = inference_s / min(faces, self.concurrency)  # the reference worker splits a job's crops
        self._links.append(max(0.0, away_s - running_s))
        per_face = inference_s / faces
        self.face_s = per_face if self.face_s is None else SERVICE_EWMA * per_face + (1 - SERVICE_EWMA) * self.face_s
        self.faces_per_job = SERVICE_EWMA * faces + (1 - SERVICE_EWMA) * self.faces_per_job


@dataclass(eq=False)
class ClientState:
    identity: bytes
    last_seen: float
    peer: str = ""
    stream: str = ""  # of its latest job, for the status report
    queue: deque[PendingJob] = field(default_factory=deque)
    queued_bytes: int = 0
    inflight: int = 0
    received: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # replies sent it, by command
    _window_start: float = 0.0
    _window_jobs: int = 0
    jobs_per_s: float = 0.0

    @property
    def idle(self) -> bool:
        return not self.queue and self.inflight == 0

    def rate(self, now: float) -> float:
        """Jobs a second: over the last full window, or over the current one once it is longer
        (so a client that stopped sending falls towards 0 instead of keeping its last rate)."""
        elapsed = now - self._window_start
        if not self._window_start:
            return 0.0
        return self._window_jobs / elapsed if elapsed >= RATE_WINDOW_S else self.jobs_per_s

    def count_job(self, now: float) -> None:
        self.received += 1
        if not self._window_start:  # its first job opens the first window
            self._window_start = now
        elif now - self._window_start >= RATE_WINDOW_S:
            elapsed = now - self._window_start
            self.jobs_per_s = self._window_jobs / elapsed if elapsed < 2 * RATE_WINDOW_S else 0.0
            self._window_start, self._window_jobs = now, 0
        self._window_jobs += 1


@dataclass
class Counters:
    received: int = 0
    dispatched: int = 0
    results: int = 0
    expired: int = 0
    busy: int = 0
    errors: int = 0
    redispatched: int = 0
    late_results: int = 0
    wrong_replies: int = 0
    workers_lost: int = 0


@dataclass(frozen=True)
class Timing:
    """Where an answered job's time went, in seconds (for percentiles and histograms)."""

    queue_s: float  # from receipt to dispatch (0 if it was never dispatched)
    compute_s: float  # from dispatch to the worker's answer: the link's round trip and the worker's time
    total_s: float  # from receipt to the reply


class Scheduler:
    def __init__(self, settings: BrokerSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.workers: dict[bytes, WorkerState] = {}
        self.clients: OrderedDict[bytes, ClientState] = OrderedDict()  # least recently seen first
        # Clients with queued jobs, in round-robin order; a client is here exactly when its queue is not empty.
        self._turns: deque[bytes] = deque()
        self.queued = 0
        self.queued_bytes = 0
        self._next_job = 0
        self.counters = Counters()
        self.timings: deque[Timing] = deque(maxlen=LATENCY_SAMPLES)
        self.draining = False

    # ----------------------------------------------------------------- clients

    def client(self, identity: bytes, now: float) -> ClientState | None:
        """The client's state, created if new; None when the table is full of clients with pending work."""
        state = self.clients.get(identity)
        if state is not None:
            state.last_seen = now
            self.clients.move_to_end(identity)
            return state
        if len(self.clients) >= self.settings.max_clients and not self._forget_one_idle_client():
            return None
        state = self.clients[identity] = ClientState(identity, now)
        return state

    def _forget_one_idle_client(self) -> bool:
        for identity, state in self.clients.items():  # oldest first
            if state.idle:
                del self.clients[identity]
                return True
        return False

    def forget_idle_clients(self, now: float) -> None:
        horizon = now - self.settings.client_idle_s
        stale = [i for i, c in self.clients.items() if c.idle and c.last_seen < horizon]
        for identity in stale:
            del self.clients[identity]

    def drop_client(self, identity: bytes) -> None:
        """The client is gone (it said DISCONNECT, or the socket says unreachable): its queued jobs go too."""
        state = self.clients.pop(identity, None)
        if state is None:
            return
        self.queued -= len(state.queue)
        self.queued_bytes -= state.queued_bytes
        for job in state.queue:
            job.answered = True
        if state.queue:
            self._turns.remove(identity)
        state.queue.clear()
        state.queued_bytes = 0
        # Its jobs at workers keep pointing at this state, not at a new one for the same identity,
        # so their late answers are dropped and never count against a newcomer.
        log.debug("client %s dropped", identity.hex())

    def submit(self, identity: bytes, msg: p.Job, now: float) -> list[Reply]:
        """Queue a client's job. Returns the replies to send now: BUSY or ERROR for this job when it
        cannot be queued, and BUSY for other clients' jobs pushed out to give this client its share."""
        self.counters.received += 1
        state = self.client(identity, now)
        if state is None:
            return [self._busy(identity, msg, "broker client table is full")]
        state.count_job(now)
        state.stream = msg.ids[0].stream
        if self.draining:
            return [self._busy(identity, msg, "broker is shutting down")]
        pool = self.pool_model()
        if pool is not None and (msg.width_px, msg.height_px) != (pool.width_px, pool.height_px):
            return [self._wrong_size(identity, msg, pool)]
        size = len(msg.ids) * msg.width_px * msg.height_px
        s = self.settings
        if len(state.queue) >= s.max_queue_per_client:
            return [self._busy(identity, msg, "this client's queue is full")]
        if state.queued_bytes + size > min(s.max_client_bytes, s.max_queue_bytes):
            return [self._busy(identity, msg, "this client's queue is full (bytes of pixels)")]
        replies = self._make_room(state, size)
        if self.queued >= s.max_queue:
            return replies + [self._busy(identity, msg, "broker queue is full")]
        if self.queued_bytes + size > s.max_queue_bytes:
            return replies + [self._busy(identity, msg, "broker queue is full (bytes of pixels)")]
        deadline_ms = min(msg.deadline_ms, s.max_deadline_ms)
        self._next_job += 1
        job = PendingJob(self._next_job, identity, state, msg, now, now + deadline_ms / 1000, size)
        if not state.queue:
            self._turns.append(identity)
        self._enqueue(state, job)
        return replies

    def _make_room(self, state: ClientState, size: int) -> list[Reply]:
        """When the shared queue is full, push out the newest jobs of the clients holding the most, as long
        as each holds more than ``state`` would after queueing this job (its fair share).

        The jobs to push out are chosen first and pushed out only if that makes room for this one:
        nobody's job is given up for a newcomer that would be refused anyway.
        """
        s = self.settings
        held = {i: self.clients[i].queued_bytes for i in self._turns}
        taken = {i: 0 for i in self._turns}  # newest jobs chosen, per client
        jobs, nbytes = self.queued, self.queued_bytes
        while jobs >= s.max_queue or nbytes + size > s.max_queue_bytes:
            biggest = max(held, key=held.get, default=None)
            if biggest is None or biggest == state.identity or held[biggest] <= state.queued_bytes + size:
                return []  # fair shares leave no room: the newcomer is refused, nobody is pushed out
            queue = self.clients[biggest].queue
            job = queue[len(queue) - 1 - taken[biggest]]
            taken[biggest] += 1
            held[biggest] -= job.size
            jobs, nbytes = jobs - 1, nbytes - job.size
            if taken[biggest] == len(queue):
                del held[biggest]
        replies: list[Reply] = []
        for identity, n in taken.items():
            client = self.clients[identity]
            for _ in range(n):
                job = client.queue.pop()
                self._dequeued(client, job)
                if not job.answered:
                    job.answered = True
                    replies.append(self._busy(job.client, job.msg, "broker queue is full: making room for other clients"))
            if n and not client.queue:
                self._turns.remove(identity)
        return replies

    def _enqueue(self, state: ClientState, job: PendingJob, *, front: bool = False) -> None:
        (state.queue.appendleft if front else state.queue.append)(job)
        state.queued_bytes += job.size
        self.queued += 1
        self.queued_bytes += job.size

    def _dequeued(self, state: ClientState, job: PendingJob) -> None:
        state.queued_bytes -= job.size
        self.queued -= 1
        self.queued_bytes -= job.size

    def _busy(self, identity: bytes, msg: p.Job, reason: str) -> Reply:
        self.counters.busy += 1
        return identity, p.Busy(ids=msg.ids, reason=reason)

    def _wrong_size(self, identity: bytes, msg: p.Job, model: p.ModelInfo) -> Reply:
        self.counters.errors += 1
        return identity, p.Error(ids=msg.ids, reason=f"crops are {msg.width_px}x{msg.height_px}; the pool's model "
                                                     f"{model.ref} takes {model.width_px}x{model.height_px}")

    # ----------------------------------------------------------------- workers

    def register(self, identity: bytes, ready: p.Ready, now: float, peer: str = "") -> str | None:
        """Add (or refresh) a worker; return a reason to refuse it, or None."""
        if identity in self.workers:
            self.workers[identity].last_seen = now
            return None
        if self.draining:
            return "broker is shutting down"
        pool = self.pool_model()
        # Workers on different models may share a pool only if a client's crops suit them all:
        # same labels, same crop size, same framing.
        if pool is not None and (pool.labels, pool.width_px, pool.height_px, pool.framing) != (
            ready.model.labels, ready.model.width_px, ready.model.height_px, ready.model.framing
        ):
            return (f"model {ready.model.ref} does not match the pool's {pool.ref} "
                    "(labels, input size or crop framing differ)")
        if len(self.workers) >= self.settings.max_workers:
            return "broker worker table is full"
        self.workers[identity] = WorkerState(identity, ready.worker, ready.capacity, ready.concurrency, ready.model,
                                             now, now, peer)
        log.info("worker %s joined%s: capacity %d, %d at once, model %s", ready.worker, f" from {peer}" if peer else "",
                 ready.capacity, ready.concurrency, ready.model.ref)
        return None

    def pool_model(self) -> p.ModelInfo | None:
        return next(iter(self.workers.values())).model if self.workers else None

    def worker_seen(self, identity: bytes, now: float) -> bool:
        state = self.workers.get(identity)
        if state is not None:
            state.last_seen = now
        return state is not None

    def remove_worker(self, identity: bytes, now: float, why: str) -> list[Reply]:
        """Forget a worker; its unanswered jobs are re-queued once if time allows, else answered ERROR."""
        state = self.workers.pop(identity, None)
        if state is None:
            return []
        self.counters.workers_lost += 1
        log.info("worker %s lost (%s) with %d job(s) in flight", state.name, why, len(state.inflight))
        replies: list[Reply] = []
        for job in state.inflight.values():
            client = job.owner
            client.inflight -= 1
            if job.answered or self.clients.get(job.client) is not client:
                continue
            if not self._requeue(job, now):
                job.answered = True
                self.counters.errors += 1
                replies.append((job.client, p.Error(ids=job.msg.ids, reason=f"worker {state.name} was lost ({why})")))
        return replies

    def reap_silent_workers(self, now: float) -> list[Reply]:
        limit = self.settings.heartbeat_interval_s * self.settings.liveness
        silent = [i for i, w in self.workers.items() if now - w.last_seen > limit]
        replies: list[Reply] = []
        for identity in silent:
            replies += self.remove_worker(identity, now, f"silent for {limit:g} s")
        return replies

    def excuse(self, stall_s: float) -> None:
        """The broker itself stood still for ``stall_s`` (a starved host): that silence is not the workers'."""
        for w in self.workers.values():
            w.last_seen += stall_s

    def complete(self, worker: bytes, reply: p.Result | p.Expired | p.Busy | p.Error, now: float) -> PendingJob | None:
        """A worker answered (any terminal reply). Returns the job if the reply is to be forwarded.

        The reply must name a job in flight at that worker and exactly that job's ids; if not, it is
        dropped and counted (``worker.wrong_replies``), and the job stays in flight. A reply to a job
        already answered (EXPIRED at its deadline) frees the credit and is dropped as late. A worker's
        BUSY (its own queue full, or it is draining) pauses that worker for a heartbeat interval and sends
        the job back to the front of its client's queue once, as for a lost worker, if time allows.
        """
        state = self.workers.get(worker)
        if state is None:
            return None
        job = state.inflight.get(reply.job) if reply.job is not None else None
        named = {i.key() for i in reply.ids}
        if job is None or (named != job.keys() and not (named == set() and not isinstance(reply, p.Result))):
            # An error reply naming no ids is the worker failing to read a job the broker sent: it is
            # about that job. Anything else must name the job's ids exactly.
            state.wrong_replies += 1
            self.counters.wrong_replies += 1
            return None
        del state.inflight[reply.job]
        job.owner.inflight -= 1
        if isinstance(reply, p.Result):
            state.done += 1
            state.measured(now - job.dispatched, sum(f.inference_ms for f in reply.faces) / 1000, len(reply.faces))
        else:
            state.failed += 1
        if job.answered or self.clients.get(job.client) is not job.owner:
            self.counters.late_results += 1  # already answered, or its client was forgotten meanwhile
            return None
        if isinstance(reply, p.Busy):
            state.paused_until = now + self.settings.heartbeat_interval_s
            if self._requeue(job, now):
                return None
        job.answered = True
        if isinstance(reply, p.Result):
            self.timings.append(Timing(job.dispatched - job.received, now - job.dispatched, now - job.received))
        return job

    def _requeue(self, job: PendingJob, now: float) -> bool:
        """Put a job its worker did not answer back at the front of its client's queue, once, if enough
        of its deadline remains; False if it may not be tried again."""
        client = job.owner
        if job.attempts or job.remaining_ms(now) < self.settings.redispatch_min_ms or self.draining:
            return False
        job.attempts += 1
        self.counters.redispatched += 1
        if not client.queue:
            self._turns.append(job.client)
        self._enqueue(client, job, front=True)
        return True

    # ----------------------------------------------------------------- time

    def expire(self, now: float) -> list[Reply]:
        """EXPIRED for every unanswered job past its deadline, queued or in flight."""
        replies: list[Reply] = []
        for identity in list(self._turns):
            client = self.clients.get(identity)
            if client is None:
                continue
            if any(j.deadline <= now for j in client.queue):
                keep = deque()
                for job in client.queue:
                    if job.deadline <= now:
                        replies.append(self._expired(job, "deadline passed while queued"))
                        self._dequeued(client, job)
                    else:
                        keep.append(job)
                client.queue = keep
                if not keep:
                    self._turns.remove(identity)
        for worker in self.workers.values():
            for job in worker.inflight.values():
                if not job.answered and job.deadline <= now:
                    replies.append(self._expired(job, f"deadline passed at worker {worker.name}"))
        return replies

    def _expired(self, job: PendingJob, reason: str) -> Reply:
        job.answered = True
        self.counters.expired += 1
        return job.client, p.Expired(ids=job.msg.ids, reason=reason)

    def abandon(self, reason: str) -> list[Reply]:
        """ERROR for every job still queued or in flight (the broker is going away)."""
        replies: list[Reply] = []
        for identity in list(self._turns):
            client = self.clients[identity]
            while client.queue:
                job = client.queue.popleft()
                self._dequeued(client, job)
                if not job.answered:
                    job.answered = True
                    self.counters.errors += 1
                    replies.append((job.client, p.Error(ids=job.msg.ids, reason=reason)))
        self._turns.clear()
        for worker in self.workers.values():
            for job in worker.inflight.values():
                if not job.answered and self.clients.get(job.client) is job.owner:
                    job.answered = True
                    self.counters.errors += 1
                    replies.append((job.client, p.Error(ids=job.msg.ids, reason=reason)))
        return replies

    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) for w in self.workers.values())

    # ----------------------------------------------------------------- dispatch

    def dispatch(self, now: float) -> tuple[list[tuple[bytes, p.Job]], list[Reply]]:
        """Hand queued jobs to workers with free credit: clients in turn, least-loaded worker first.

        Returns the jobs to send (worker identity, job with the broker's id and
        the remaining deadline) and the replies for jobs answered instead: EXPIRED
        for those no worker can finish in time, ERROR for crops the workers' model
        does not take.
        """
        sends: list[tuple[bytes, p.Job]] = []
        replies: list[Reply] = []
        while self._turns and self.queued:
            free = [w for w in self.workers.values() if len(w.inflight) < w.credits and w.paused_until <= now]
            if not free:
                break
            identity = self._turns.popleft()
            client = self.clients.get(identity)
            if client is None or not client.queue:
                continue
            job = client.queue.popleft()
            self._dequeued(client, job)
            if client.queue:
                self._turns.append(identity)
            if job.answered:
                continue
            remaining_s = job.deadline - now
            faces = len(job.msg.ids)
            in_time = [w for w in free if w.expected_s(faces) < remaining_s]
            if not in_time:
                best = min(w.expected_s(faces) for w in free)
                reason = ("deadline passed while queued" if remaining_s <= 0 else
                          f"{1000 * remaining_s:.0f} ms left; the least busy worker needs about {1000 * best:.0f} ms")
                replies.append(self._expired(job, reason))
                continue
            worker = min(in_time, key=lambda w: w.load)
            model = worker.model
            if (job.msg.width_px, job.msg.height_px) != (model.width_px, model.height_px):
                job.answered = True
                replies.append(self._wrong_size(job.client, job.msg, model))
                continue
            worker.inflight[job.job] = job
            client.inflight += 1
            job.dispatched = now
            self.counters.dispatched += 1
            sends.append((worker.identity, job.msg.model_copy(
                update={"job": job.job, "deadline_ms": max(1, job.remaining_ms(now))})))
        return sends, replies
