"""The broker's bookkeeping and rules, with no sockets: what to send where, and why.

The server (:mod:`fer_swarm.broker.server`) feeds it what arrives and sends
what it returns. Keeping the rules here makes each one testable alone:

- Credits: a worker announces a capacity; it never holds more jobs than that.
  A job is one JOB message (the crops of one frame, usually): credits count
  messages, so a worker with one thread still holds the next frame while it
  works on this one, however many faces each frame has.
  The least-loaded worker (lowest share of its capacity in use) goes first, so
  a 4-thread Pi and a 1-thread laptop fill in proportion.
- Fairness: each client has its own queue and dispatch takes one job per
  client in turn, so a client flooding the broker only delays itself.
- Deadlines: a job past its deadline is answered EXPIRED, whether it is still
  queued or already at a worker (whose late answer is then dropped).
- Lost workers: their unanswered jobs go back to the front of their client's
  queue once, if enough of the deadline remains; otherwise ERROR.
- Bounds: total and per-client queue lengths and the bytes of pixels queued
  (BUSY beyond them), the client table (clients with nothing pending are
  forgotten first) and the worker table. Crops of another size than the
  pool's model are answered ERROR at once instead of being queued.

The invariant everything here serves: every job gets exactly one terminal
reply (RESULT, EXPIRED, BUSY or ERROR) while its client is known. ``answered``
on a job is the single flag that enforces "exactly one".
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from .. import protocol as p
from ..config import BrokerSettings

log = logging.getLogger(__name__)

Reply = tuple[bytes, p.Message]  # (client identity, message to send it)


@dataclass(eq=False)
class PendingJob:
    job: int
    client: bytes
    owner: ClientState  # the client state it was queued under: a client forgotten and back is a new one
    msg: p.Job
    deadline: float  # monotonic seconds
    size: int  # bytes of pixels it holds
    attempts: int = 0
    answered: bool = False

    def remaining_ms(self, now: float) -> int:
        return int((self.deadline - now) * 1000)


@dataclass(eq=False)
class WorkerState:
    identity: bytes
    name: str
    capacity: int
    model: p.ModelInfo
    last_seen: float
    inflight: dict[int, PendingJob] = field(default_factory=dict)

    @property
    def load(self) -> float:
        return len(self.inflight) / self.capacity


@dataclass(eq=False)
class ClientState:
    identity: bytes
    last_seen: float
    queue: deque[PendingJob] = field(default_factory=deque)
    inflight: int = 0

    @property
    def idle(self) -> bool:
        return not self.queue and self.inflight == 0


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
    workers_lost: int = 0


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
        self.queued_bytes -= sum(job.size for job in state.queue)
        for job in state.queue:
            job.answered = True
        if state.queue:
            self._turns.remove(identity)
        state.queue.clear()
        # Its jobs at workers keep pointing at this state, not at a new one for the same identity,
        # so their late answers are dropped and never count against a newcomer.
        log.debug("client %s dropped", identity.hex())

    def submit(self, identity: bytes, msg: p.Job, now: float) -> Reply | None:
        """Queue a client's job; return an immediate BUSY reply when it cannot be queued."""
        self.counters.received += 1
        state = self.client(identity, now)
        if state is None:
            return self._busy(identity, msg, "broker client table is full")
        pool = self.pool_model()
        if pool is not None and (msg.width_px, msg.height_px) != (pool.width_px, pool.height_px):
            self.counters.errors += 1
            return identity, p.Error(ids=msg.ids, reason=f"crops are {msg.width_px}x{msg.height_px}; the pool's "
                                                         f"model {pool.ref} takes {pool.width_px}x{pool.height_px}")
        size = len(msg.ids) * msg.width_px * msg.height_px
        if self.queued >= self.settings.max_queue:
            return self._busy(identity, msg, "broker queue is full")
        if self.queued_bytes + size > self.settings.max_queue_bytes:
            return self._busy(identity, msg, "broker queue is full (bytes of pixels)")
        if len(state.queue) >= self.settings.max_queue_per_client:
            return self._busy(identity, msg, "this client's queue is full")
        deadline_ms = min(msg.deadline_ms, self.settings.max_deadline_ms)
        self._next_job += 1
        job = PendingJob(self._next_job, identity, state, msg, now + deadline_ms / 1000, size)
        if not state.queue:
            self._turns.append(identity)
        state.queue.append(job)
        self.queued += 1
        self.queued_bytes += size
        return None

    def _busy(self, identity: bytes, msg: p.Job, reason: str) -> Reply:
        self.counters.busy += 1
        return identity, p.Busy(ids=msg.ids, reason=reason)

    # ----------------------------------------------------------------- workers

    def register(self, identity: bytes, ready: p.Ready, now: float) -> str | None:
        """Add (or refresh) a worker; return a reason to refuse it, or None."""
        if identity in self.workers:
            self.workers[identity].last_seen = now
            return None
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
        self.workers[identity] = WorkerState(identity, ready.worker, ready.capacity, ready.model, now)
        log.info("worker %s joined: capacity %d, model %s", ready.worker, ready.capacity, ready.model.ref)
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
            if job.attempts == 0 and job.remaining_ms(now) >= self.settings.redispatch_min_ms:
                job.attempts += 1
                self.counters.redispatched += 1
                if not client.queue:
                    self._turns.append(job.client)
                client.queue.appendleft(job)
                self.queued += 1
                self.queued_bytes += job.size
            else:
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

    def complete(self, worker: bytes, job_id: int | None) -> PendingJob | None:
        """A worker answered ``job_id`` (any terminal reply): free its credit.

        Returns the job if its client still waits for this answer (forward it),
        None if the answer is late (already EXPIRED) or unknown.
        """
        state = self.workers.get(worker)
        job = state.inflight.pop(job_id, None) if state is not None and job_id is not None else None
        if job is None:
            return None
        job.owner.inflight -= 1
        if job.answered or self.clients.get(job.client) is not job.owner:
            self.counters.late_results += 1  # already answered, or its client was forgotten meanwhile
            return None
        job.answered = True
        return job

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
                        self.queued_bytes -= job.size
                    else:
                        keep.append(job)
                self.queued -= len(client.queue) - len(keep)
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

    # ----------------------------------------------------------------- dispatch

    def dispatch(self, now: float) -> tuple[list[tuple[bytes, p.Job]], list[Reply]]:
        """Hand queued jobs to workers with free credit: clients in turn, least-loaded worker first.

        Returns the jobs to send (worker identity, job with the broker's id and
        the remaining deadline) and the EXPIRED replies for jobs whose deadline
        ran out at the head of the queue.
        """
        sends: list[tuple[bytes, p.Job]] = []
        replies: list[Reply] = []
        while self._turns and self.queued:
            worker = self._least_loaded()
            if worker is None:
                break
            identity = self._turns.popleft()
            client = self.clients.get(identity)
            if client is None or not client.queue:
                continue
            job = client.queue.popleft()
            self.queued -= 1
            self.queued_bytes -= job.size
            if client.queue:
                self._turns.append(identity)
            if job.answered:
                continue
            remaining = job.remaining_ms(now)
            if remaining <= 0:
                replies.append(self._expired(job, "deadline passed while queued"))
                continue
            worker.inflight[job.job] = job
            client.inflight += 1
            self.counters.dispatched += 1
            sends.append((worker.identity, job.msg.model_copy(update={"job": job.job, "deadline_ms": remaining})))
        return sends, replies

    def _least_loaded(self) -> WorkerState | None:
        best = None
        for w in self.workers.values():
            if len(w.inflight) < w.capacity and (best is None or w.load < best.load):
                best = w
        return best
