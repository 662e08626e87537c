"""Matching replies to faces, and deciding when a frame is shown: the edge's pure logic.

No sockets and no clock here: every method takes ``now`` (seconds on one
monotonic clock), so the rules can be tested alone and exactly.

The rules, and why:

- Every face in a frame belongs to a track (:mod:`.tracks`); the relabel
  budget decides which of them are sent. A sent face's correlation id is
  ``(stream, frame, track id)``: track ids are unique within a frame and never
  reused, so a reply names the very face and track it answers.
- Replies are matched by correlation id, never by arrival order: the pool
  answers faces in whatever order its workers finish. Each answer also goes
  to the track's label state (:class:`.labels.TrackLabels`), stamped with the
  time of the frame its crop came from.
- Frames are shown in capture order (video must not run backwards). A frame is
  shown as soon as every face sent from it has its reply, or when
  ``display_delay_ms`` has passed since capture, whatever has arrived by then
  (real time comes first: a slow worker delays one frame's labels, never the
  video), or early, oldest first, when more than ``max_pending_frames`` are
  held (bounded memory). A frame that sent nothing is ready at once.
- Each face is shown with its track's label as it stands when the frame is
  shown. A face whose track has no label yet gets its own job's error kind,
  or ``TIMEOUT`` if no reply had arrived; a reply that comes after its frame
  was shown still updates the track's label, but is counted as late.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from ..faces import Box, Point
from ..protocol import Busy, CorrelationId, Error, Expired, Result
from .labels import TrackLabels
from .tracks import Track

__all__ = ["TIMEOUT", "UNSENT", "FaceOutcome", "ShownFrame", "FramePipeline"]

log = logging.getLogger(__name__)

TIMEOUT = "TIMEOUT"  # no label: no reply had arrived when the frame was shown
UNSENT = "UNSENT"  # the edge could not hand the job to its socket

Reply = Result | Expired | Busy | Error
_SHOWN_TIMES_KEPT = 64  # frames: two seconds at 30 fps, longer than any deadline the edge uses


@dataclass(frozen=True)
class FaceOutcome:
    """One face as shown: its track, box, the label shown, and this frame's own answer if it had one.

    ``label`` and ``probabilities`` are what the viewer sees (the track's
    smoothed label); ``raw_label`` and ``raw_probabilities`` are the answer to
    this frame's own crop, when it was sent and answered in time. ``error`` is
    set only when no label is shown: ``EXPIRED``, ``BUSY`` or ``ERROR`` (the
    broker's or a worker's reply), ``TIMEOUT`` or ``UNSENT`` (decided at the
    edge). ``job_error`` is this frame's own job's failure, label or not.
    """

    id: CorrelationId
    box: Box
    track: int = 0
    landmarks: tuple[Point, ...] | None = None
    label: str | None = None
    probabilities: Mapping[str, float] | None = None
    sent: bool = False
    raw_label: str | None = None
    raw_probabilities: Mapping[str, float] | None = None
    worker: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    reason: str = ""
    job_error: str | None = None

    @property
    def answered(self) -> bool:
        """A label is shown."""
        return self.label is not None

    def ranked(self) -> list[tuple[str, float]]:
        """``(label, probability)`` pairs of the shown probabilities, most probable first; empty without a label."""
        if not self.probabilities:
            return []
        return sorted(self.probabilities.items(), key=lambda kv: kv[1], reverse=True)


@dataclass(frozen=True)
class ShownFrame:
    """A frame ready to be shown, with the outcome of each of its faces (largest detected face first)."""

    index: int
    time_s: float
    image: np.ndarray = field(repr=False)
    faces: tuple[FaceOutcome, ...]

    def events(self) -> list[dict[str, Any]]:
        """One JSON-ready record per face: the ``--events`` line format (docs/protocol.md, "Edge events")."""
        return [
            {
                "frame": self.index,
                "time_s": round(self.time_s, 4),
                "track": f.track,
                "box": f.box.as_list(),
                "landmarks": None if f.landmarks is None else [[round(x, 1), round(y, 1)] for x, y in f.landmarks],
                "label": f.label,
                "probabilities": dict(f.probabilities) if f.probabilities is not None else None,
                "sent": f.sent,
                "raw_label": f.raw_label,
                "raw_probabilities": dict(f.raw_probabilities) if f.raw_probabilities is not None else None,
                "latency_ms": None if f.latency_ms is None else round(f.latency_ms, 2),
                "worker": f.worker,
                "error": None if f.error is None else (f"{f.error}: {f.reason}" if f.reason else f.error),
                "job_error": f.job_error,
            }
            for f in self.faces
        ]


@dataclass
class _Face:
    track: int
    time_s: float  # its frame's time in the source: when an answer for it holds
    box: Box
    landmarks: tuple[Point, ...] | None
    sent: bool
    sent_at: float | None = None
    # This frame's own job: its answer or its failure, and how long it took.
    latency_ms: float | None = None
    raw: Mapping[str, Any] | None = None
    error: str | None = None
    reason: str = ""

    @property
    def waiting(self) -> bool:
        return self.sent and self.raw is None and self.error is None

    def replied(self, now: float) -> None:
        self.latency_ms = None if self.sent_at is None else (now - self.sent_at) * 1000.0


@dataclass
class _Pending:
    index: int
    time_s: float
    image: np.ndarray
    captured_at: float
    faces: dict[int, _Face]  # by track id, in the order they were added

    def complete(self) -> bool:
        return not any(f.waiting for f in self.faces.values())


class FramePipeline:
    """Frames waiting for their labels, in capture order. Not thread-safe: one edge loop owns it."""

    def __init__(self, stream: str, labels: TrackLabels, *, display_delay_ms: int = 150, max_pending_frames: int = 8):
        if max_pending_frames < 1:
            raise ValueError("max_pending_frames must be at least 1")
        self.stream = stream
        self.labels = labels
        self.display_delay_s = display_delay_ms / 1000.0
        self.max_pending_frames = max_pending_frames
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self.late_replies = 0
        self._last_index = -1
        # Times of the frames shown lately, so a late RESULT can still update its track's label.
        self._shown_times: OrderedDict[int, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add_frame(self, index: int, time_s: float, image: np.ndarray, tracks: Sequence[Track],
                  send: Sequence[bool], now: float) -> list[CorrelationId]:
        """Hold a new frame showing ``tracks``; return the correlation ids of those to be sent (``send``).

        Frame indices must increase over the pipeline's life: frames are shown in the
        order they were added, and a reused index would let a late reply for a shown
        frame label a new one.
        """
        if index <= self._last_index:
            raise ValueError(f"frame {index} added after frame {self._last_index}")
        if len(send) != len(tracks):
            raise ValueError("one send flag per track")
        self._last_index = index
        faces = {tr.id: _Face(tr.id, time_s, tr.box, None if tr.missed else tr.face.landmarks, s)
                 for tr, s in zip(tracks, send)}
        if len(faces) != len(tracks):
            raise ValueError(f"frame {index} shows a track twice")
        self._pending[index] = _Pending(index, time_s, image, now, faces)
        return [CorrelationId(stream=self.stream, frame=index, face=tr.id) for tr, s in zip(tracks, send) if s]

    def forget_tracks(self, live: set[int]) -> None:
        """Drop the label state of tracks that are neither ``live`` nor shown in a held frame (bounded memory)."""
        held = {track for p in self._pending.values() for track in p.faces}
        self.labels.keep_only(live | held)

    def sent(self, ids: Sequence[CorrelationId], now: float) -> None:
        """The job for ``ids`` left at ``now``: their latency counts from here."""
        for id in ids:
            face = self._face(id)
            if face is not None:
                face.sent_at = now

    def failed(self, ids: Sequence[CorrelationId], kind: str, reason: str = "") -> None:
        """The job for ``ids`` failed at the edge (e.g. ``UNSENT``); it will get no reply."""
        for id in ids:
            face = self._face(id)
            if face is not None and face.waiting:
                face.error, face.reason = kind, reason

    def on_reply(self, msg: Reply, now: float) -> int:
        """Record a reply received at ``now``; return how many waiting faces it answered.

        A RESULT also updates each track's label state, even when its frame was
        already shown. Each face of the reply that answers no face still waiting
        (unknown id, frame already shown, or a duplicate) is counted in ``late_replies``.
        """
        if not msg.ids:
            # The broker could not read the job's header: nothing to match, so say so.
            log.warning("%s reply without correlation ids dropped: %s", msg.command.value, getattr(msg, "reason", ""))
            self.late_replies += 1
            return 0
        answered = 0
        if isinstance(msg, Result):
            for f in msg.faces:
                face = self._face(f.id)
                if face is None or not face.waiting:
                    self.late_replies += 1
                    log.debug("late or unknown RESULT for %s", f.id)
                    shown_at = self._shown_times.get(f.id.frame) if f.id.stream == self.stream else None
                    if shown_at is not None:  # still news about that track's face
                        self.labels.answer(f.id.face, f.probabilities, shown_at)
                    continue
                self.labels.answer(face.track, f.probabilities, face.time_s)
                face.replied(now)
                face.raw = dict(label=f.label, probabilities=MappingProxyType(dict(f.probabilities)), worker=msg.worker)
                answered += 1
            return answered
        for id in msg.ids:
            face = self._face(id)
            if face is None or not face.waiting:
                self.late_replies += 1
                log.debug("late or unknown %s for %s dropped", msg.command.value, id)
                continue
            face.error, face.reason = msg.command.value, msg.reason
            face.replied(now)
            answered += 1
        return answered

    def seconds_until_due(self, now: float) -> float | None:
        """Seconds until the oldest held frame must be shown (0 if it may be shown now); None if none is held."""
        if not self._pending:
            return None
        oldest = next(iter(self._pending.values()))
        if oldest.complete() or len(self._pending) > self.max_pending_frames:
            return 0.0
        return max(0.0, oldest.captured_at + self.display_delay_s - now)

    def ready(self, now: float) -> list[ShownFrame]:
        """Remove and return, oldest first, every frame that is to be shown at ``now``."""
        shown = []
        while self._pending:
            oldest = next(iter(self._pending.values()))
            overfull = len(self._pending) > self.max_pending_frames
            if not (oldest.complete() or overfull or now - oldest.captured_at >= self.display_delay_s):
                break
            del self._pending[oldest.index]
            shown.append(self._finish(oldest))
        return shown

    def flush(self) -> list[ShownFrame]:
        """Remove and return every held frame now, with whatever has arrived."""
        shown = [self._finish(p) for p in self._pending.values()]
        self._pending.clear()
        return shown

    def _finish(self, p: _Pending) -> ShownFrame:
        self._shown_times[p.index] = p.time_s
        while len(self._shown_times) > _SHOWN_TIMES_KEPT:
            self._shown_times.popitem(last=False)
        return ShownFrame(index=p.index, time_s=p.time_s, image=p.image,
                          faces=tuple(self._outcome(p, f) for f in p.faces.values()))

    def _outcome(self, p: _Pending, f: _Face) -> FaceOutcome:
        shown = self.labels.shown(f.track, p.time_s)
        raw = f.raw or {}
        job_error = TIMEOUT if f.waiting else f.error
        outcome = dict(
            id=CorrelationId(stream=self.stream, frame=p.index, face=f.track), box=f.box, track=f.track,
            landmarks=f.landmarks, sent=f.sent, raw_label=raw.get("label"), raw_probabilities=raw.get("probabilities"),
            worker=raw.get("worker"), latency_ms=f.latency_ms, job_error=job_error,
        )
        if shown is not None:
            return FaceOutcome(label=shown.label, probabilities=MappingProxyType(shown.probabilities), **outcome)
        return FaceOutcome(error=job_error or TIMEOUT, reason=f.reason, **outcome)

    def _face(self, id: CorrelationId) -> _Face | None:
        if id.stream != self.stream:
            return None
        pending = self._pending.get(id.frame)
        return None if pending is None else pending.faces.get(id.face)
