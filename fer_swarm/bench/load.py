"""Load generation against a broker: closed loop (K jobs in flight) or open loop (a target rate).

A client is one DEALER socket that sends real JOB messages, each of
``faces_per_job`` crops (as an edge sends a frame's faces together), and
measures each job's latency from send to terminal reply. Counts and latency
samples are per face, so figures compare with inference one face at a time. Results are kept per time window
so a caller can tell whether the rate has settled before trusting a figure
(the benchmark runner's ``settled_at``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from .. import protocol as p
from .. import security


@dataclass
class Window:
    seconds: float
    results: int = 0
    expired: int = 0
    busy: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.results / self.seconds if self.seconds else 0.0


@dataclass
class LoadResult:
    windows: list[Window]
    sent: int
    unanswered: int

    def merged(self, skip: int = 0) -> dict:
        ws = self.windows[skip:]
        lat = np.array([x for w in ws for x in w.latencies_ms]) if ws else np.array([])
        seconds = sum(w.seconds for w in ws)
        pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if lat.size else (lambda q: None)
        return {
            "throughput_per_s": round(sum(w.results for w in ws) / seconds, 1) if seconds else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "results": sum(w.results for w in ws), "expired": sum(w.expired for w in ws),
            "busy": sum(w.busy for w in ws), "errors": sum(w.errors for w in ws),
            "window_throughputs": [round(w.throughput, 1) for w in ws],
        }


class LoadClient:
    def __init__(self, ctx: zmq.Context, endpoint: str, *, stream: str = "bench", crop: np.ndarray | None = None,
                 deadline_ms: int = 2000, faces_per_job: int = 1,
                 curve: tuple[security.KeyPair, bytes] | None = None):
        if not 1 <= faces_per_job <= p.MAX_CROPS:
            raise ValueError(f"faces_per_job must be 1..{p.MAX_CROPS}, got {faces_per_job}")
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = self.sock.rcvhwm = 100_000
        if curve:
            security.make_client(self.sock, *curve)
        self.sock.connect(endpoint)
        self.stream = stream
        self.crop = np.zeros((48, 48), np.uint8) if crop is None else crop
        self.deadline_ms = deadline_ms
        self.faces_per_job = faces_per_job
        self._sent_at: dict[int, float] = {}
        self._frame = 0

    def close(self) -> None:
        self.sock.close(0)

    def wait_ready(self, timeout_s: float = 30.0, min_workers: int = 1) -> p.Welcome:
        """HELLO until the broker reports a model and at least ``min_workers`` registered workers."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.sock.send_multipart(p.encode(p.Hello(client=self.stream)))
            if self.sock.poll(200):
                msg = p.decode(self.sock.recv_multipart())
                if isinstance(msg, p.Welcome) and msg.model is not None and msg.workers >= min_workers:
                    return msg
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {min_workers} worker(s) registered with the broker in {timeout_s:g} s")

    def _send(self) -> None:
        self._frame += 1
        n = self.faces_per_job
        ids = tuple(p.CorrelationId(stream=self.stream, frame=self._frame, face=i) for i in range(n))
        job = p.Job(ids=ids, deadline_ms=self.deadline_ms, width_px=self.crop.shape[1], height_px=self.crop.shape[0],
                    payloads=(self.crop.tobytes(),) * n)
        self._sent_at[self._frame] = time.perf_counter()
        self.sock.send_multipart(p.encode(job))

    def _receive(self, window: Window, timeout_ms: float) -> int:
        got = 0
        if not self.sock.poll(timeout_ms):
            return 0
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return got
            msg = p.decode(frames)
            ids = getattr(msg, "ids", ())  # replies to jobs; a stray WELCOME or HEARTBEAT has none
            if not ids or (t0 := self._sent_at.pop(ids[0].frame, None)) is None:
                continue
            got += 1
            n = len(ids)
            if isinstance(msg, p.Result):
                window.results += n
                window.latencies_ms.extend([(time.perf_counter() - t0) * 1000] * n)
            elif isinstance(msg, p.Expired):
                window.expired += n
            elif isinstance(msg, p.Busy):
                window.busy += n
            else:
                window.errors += n

    def closed_loop(self, in_flight: int, window_s: float, windows: int, on_window=None) -> LoadResult:
        """Keep ``in_flight`` jobs outstanding for ``windows`` windows of ``window_s`` seconds each.

        ``on_window(window)``, if given, is called as each window closes (to stream figures out).
        """
        out, sent = [], 0
        for _ in range(in_flight):
            self._send()
            sent += 1
        for _ in range(windows):
            w = Window(window_s)
            end = time.perf_counter() + window_s
            while (left := end - time.perf_counter()) > 0:
                for _ in range(self._receive(w, left * 1000)):
                    self._send()
                    sent += 1
            out.append(w)
            if on_window:
                on_window(w)
        return LoadResult(out, sent, self._drain())

    def open_loop(self, rate_per_s: float, window_s: float, windows: int, on_window=None) -> LoadResult:
        """Send ``rate_per_s`` faces a second regardless of replies (as a camera does) for ``windows`` windows."""
        out, sent = [], 0
        interval = self.faces_per_job / rate_per_s
        next_send = time.perf_counter()
        for _ in range(windows):
            w = Window(window_s)
            end = time.perf_counter() + window_s
            while (now := time.perf_counter()) < end:
                while next_send <= now:
                    self._send()
                    sent += 1
                    next_send += interval
                self._receive(w, max(0.0, min(next_send, end) - time.perf_counter()) * 1000)
            out.append(w)
            if on_window:
                on_window(w)
        return LoadResult(out, sent, self._drain())

    def _drain(self, timeout_s: float = 3.0) -> int:
        """Collect the replies still owed (not counted in any window); return how many never came."""
        spare = Window(timeout_s)
        end = time.perf_counter() + timeout_s
        while self._sent_at and (left := end - time.perf_counter()) > 0:
            self._receive(spare, left * 1000)
        unanswered = len(self._sent_at)
        self._sent_at.clear()
        return unanswered
