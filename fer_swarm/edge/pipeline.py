"""Matching replies to faces, and deciding when a frame is shown: the edge's pure logic.

No sockets and no clock here: every method takes ``now`` (seconds on one
monotonic clock), so the rules can be tested alone and exactly.

The rules, and why:

- Replies are matched by correlation id ``(stream, frame, face)``, never by
  arrival order: the pool answers faces in whatever order its workers finish.
- Frames are shown in capture order (video must not run backwards). A frame is
  shown as soon as every face has its reply, or when ``display_delay_ms`` has
  passed since capture, whatever has arrived by then (real time comes first:
  a slow worker delays one frame's labels, never the video), or early, oldest
  first, when more than ``max_pending_frames`` are held (bounded memory).
- A face still without a reply when its frame is shown gets error ``TIMEOUT``.
  Its reply, when it comes, is counted as late and dropped: stale work is
  dropped, not queued.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from ..faces import Box
from ..protocol import Busy, CorrelationId, Error, Expired, Result

__all__ = ["TIMEOUT", "UNSENT", "FaceOutcome", "ShownFrame", "FramePipeline"]

log = logging.getLogger(__name__)

TIMEOUT = "TIMEOUT"  # no reply had arrived when the frame was shown
UNSENT = "UNSENT"  # the edge could not hand the job to its socket

Reply = Result | Expired | Busy | Error


@dataclass(frozen=True)
class FaceOutcome:
    """What became of one face when its frame was shown: a label, or an error kind and reason.

    ``error`` is a kind: ``EXPIRED``, ``BUSY`` or ``ERROR`` (the broker's or a
    worker's reply), ``TIMEOUT`` or ``UNSENT`` (decided here, at the edge).
    """

    id: CorrelationId
    box: Box
    label: str | None = None
    probabilities: Mapping[str, float] | None = None
    worker: str | None = None
    latency_ms: float | None = None
    error: str | None = None
    reason: str = ""

    @property
    def answered(self) -> bool:
        return self.error is None

    def ranked(self) -> list[tuple[str, float]]:
        """``(label, probability)`` pairs, most probable first; empty for an error."""
        if not self.probabilities:
            return []
        return sorted(self.probabilities.items(), key=lambda kv: kv[1], reverse=True)


@dataclass(frozen=True)
class ShownFrame:
    """A frame ready to be shown, with the outcome of each of its faces (largest face first)."""

    index: int
    time_s: float
    image: np.ndarray = field(repr=False)
    faces: tuple[FaceOutcome, ...]

    def events(self) -> list[dict[str, Any]]:
        """One JSON-ready record per face: the ``--events`` line format."""
        return [
            {
                "frame": self.index,
                "time_s": round(self.time_s, 4),
                "box": f.box.as_list(),
                "label": f.label,
                "probabilities": dict(f.probabilities) if f.probabilities is not None else None,
                "latency_ms": None if f.latency_ms is None else round(f.latency_ms, 2),
                "worker": f.worker,
                "error": None if f.error is None else (f"{f.error}: {f.reason}" if f.reason else f.error),
            }
            for f in self.faces
        ]


@dataclass
class _Face:
    box: Box
    sent_at: float | None = None
    outcome: FaceOutcome | None = None


@dataclass
class _Pending:
    index: int
    time_s: float
    image: np.ndarray
    captured_at: float
    faces: list[_Face]

    def complete(self) -> bool:
        return all(f.outcome is not None for f in self.faces)


class FramePipeline:
    """Frames waiting for their labels, in capture order. Not thread-safe: one edge loop owns it."""

    def __init__(self, stream: str, *, display_delay_ms: int = 150, max_pending_frames: int = 8):
        if max_pending_frames < 1:
            raise ValueError("max_pending_frames must be at least 1")
        self.stream = stream
        self.display_delay_s = display_delay_ms / 1000.0
        self.max_pending_frames = max_pending_frames
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self.late_replies = 0
        self._last_index = -1

    def __len__(self) -> int:
        return len(self._pending)

    def add_frame(
        self, index: int, time_s: float, image: np.ndarray, boxes: list[Box], now: float
    ) -> list[CorrelationId]:
        """Hold a new frame; return the correlation id of each of its faces, in ``boxes`` order.

        Frame indices must increase over the pipeline's life: frames are shown in the
        order they were added, and a reused index would let a late reply for a shown
        frame label a new one.
        """
        if index <= self._last_index:
            raise ValueError(f"frame {index} added after frame {self._last_index}")
        self._last_index = index
        self._pending[index] = _Pending(index, time_s, image, now, [_Face(b) for b in boxes])
        return [CorrelationId(stream=self.stream, frame=index, face=i) for i in range(len(boxes))]

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
            if face is not None and face.outcome is None:
                face.outcome = FaceOutcome(id=id, box=face.box, error=kind, reason=reason)

    def on_reply(self, msg: Reply, now: float) -> int:
        """Record a reply received at ``now``; return how many waiting faces it answered.

        Each face of the reply that answers no face still waiting (unknown id,
        frame already shown, or a duplicate) is counted in ``late_replies``.
        """
        if not msg.ids:
            # The broker could not read the job's header: nothing to match, so say so.
            log.warning("%s reply without correlation ids dropped: %s", msg.command.value, getattr(msg, "reason", ""))
            self.late_replies += 1
            return 0
        if isinstance(msg, Result):
            outcomes = [(f.id, dict(label=f.label, probabilities=MappingProxyType(dict(f.probabilities)),
                                    worker=msg.worker)) for f in msg.faces]
        else:
            outcomes = [(id, dict(error=msg.command.value, reason=msg.reason)) for id in msg.ids]
        answered = 0
        for id, fields in outcomes:
            face = self._face(id)
            if face is None or face.outcome is not None:
                self.late_replies += 1
                log.debug("late or unknown reply %s for %s dropped", msg.command.value, id)
                continue
            latency_ms = None if face.sent_at is None else (now - face.sent_at) * 1000.0
            face.outcome = FaceOutcome(id=id, box=face.box, latency_ms=latency_ms, **fields)
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
        faces = tuple(
            f.outcome or FaceOutcome(id=CorrelationId(stream=self.stream, frame=p.index, face=i), box=f.box,
                                     error=TIMEOUT)
            for i, f in enumerate(p.faces)
        )
        return ShownFrame(index=p.index, time_s=p.time_s, image=p.image, faces=faces)

    def _face(self, id: CorrelationId) -> _Face | None:
        if id.stream != self.stream:
            return None
        pending = self._pending.get(id.frame)
        if pending is None or id.face >= len(pending.faces):
            return None
        return pending.faces[id.face]
