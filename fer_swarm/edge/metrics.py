"""What a running edge tells about itself: its Prometheus metrics, and the frame rate they and the progress share.

Names are the team's (docs/edge.md, "Metrics"). Counts of crops and replies
are per face crop, not per JOB, so ``crops_sent_total`` and the sum of
``replies_total`` over outcomes can be compared directly: the difference is
crops still in flight, or never answered in time (the frame was shown with
``TIMEOUT``). ``unsent`` is the edge's own outcome for a crop its socket
would not take; the others are the broker's and workers' replies.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..protocol import Busy, CorrelationId, Error, Expired, Result
from ..telemetry import TIME_BUCKETS_S

__all__ = ["EdgeMetrics", "FrameRate", "OUTCOMES"]

OUTCOMES = ("result", "expired", "busy", "error", "unsent")
FACES_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)
# Send times kept for crops awaiting a reply; past this the oldest are forgotten
# (their replies, if any, are then counted but not timed). 4096 crops is well over
# 10 s (the broker's deadline cap) of 8 faces at 30 fps.
_IN_FLIGHT_KEPT = 4096


class FrameRate:
    """Frames per second over the last ``window_s``: what a viewer would call the frame rate now.

    Thread-safe: the edge loop ticks it, the metrics server's thread reads it.
    """

    def __init__(self, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        now = self._clock()
        with self._lock:
            self._times.append(now)
            self._expire(now)

    def per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._expire(now)
            return len(self._times) / self.window_s

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


class EdgeMetrics:
    """The edge's metrics in a registry of its own (never the library's global one).

    The edge loop calls :meth:`frame`, :meth:`sent`, :meth:`unsent` and
    :meth:`replied`; ``registry`` is what ``telemetry.serve`` exposes.
    Not thread-safe apart from the metrics themselves: one edge loop feeds it.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.monotonic):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.rate = FrameRate(clock=clock)
        self.frames = Counter("fer_swarm_edge_frames", "Frames read from the source and processed.", registry=r)
        self.fps = Gauge("fer_swarm_edge_fps", "Frames processed per second, over the last second.", registry=r)
        self.fps.set_function(self.rate.per_second)
        self.faces_per_frame = Histogram("fer_swarm_edge_faces_per_frame", "Faces shown per processed frame.",
                                         buckets=FACES_BUCKETS, registry=r)
        self.crops_sent = Counter("fer_swarm_edge_crops_sent", "Face crops handed to the socket, to the broker.",
                                  registry=r)
        self.replies = Counter("fer_swarm_edge_replies", "Face crops answered, by outcome (unsent: the socket "
                               "would not take it; the others: the broker's or a worker's reply).",
                               ["outcome"], registry=r)
        for outcome in OUTCOMES:  # exported as 0 from the start, so rate() works on the first one
            self.replies.labels(outcome)
        self.reply_seconds = Histogram("fer_swarm_edge_reply_seconds", "From a crop's JOB sent to its reply.",
                                       buckets=TIME_BUCKETS_S, registry=r)
        self.frame_seconds = Histogram("fer_swarm_edge_frame_seconds", "The edge's own work on a frame: detect, "
                                       "track, crop and send.", buckets=TIME_BUCKETS_S, registry=r)
        self._sent_at: OrderedDict[CorrelationId, float] = OrderedDict()

    def frame(self, faces: int, seconds: float) -> None:
        """One frame processed, showing ``faces``, in ``seconds`` of the edge's own work."""
        self.frames.inc()
        self.rate.tick()
        self.faces_per_frame.observe(faces)
        self.frame_seconds.observe(seconds)

    def sent(self, ids: Sequence[CorrelationId], now: float) -> None:
        self.crops_sent.inc(len(ids))
        for id in ids:
            self._sent_at[id] = now
        while len(self._sent_at) > _IN_FLIGHT_KEPT:
            self._sent_at.popitem(last=False)

    def unsent(self, n: int) -> None:
        self.replies.labels("unsent").inc(n)

    def replied(self, msg: Result | Expired | Busy | Error, now: float) -> None:
        """Count a reply's crops by outcome, and time those whose sending was seen."""
        ids = [f.id for f in msg.faces] if isinstance(msg, Result) else list(msg.ids)
        outcome = "result" if isinstance(msg, Result) else msg.command.value.lower()
        # A reply without ids (the broker could not read the job) still answers something: count it once.
        self.replies.labels(outcome).inc(max(1, len(ids)))
        for id in ids:
            sent_at = self._sent_at.pop(id, None)
            if sent_at is not None:
                self.reply_seconds.observe(max(0.0, now - sent_at))
