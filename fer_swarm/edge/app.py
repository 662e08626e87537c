"""The edge program: capture -> detect -> track -> (relabel budget) -> crop -> one JOB per frame ->
match replies -> smooth labels -> draw -> output.

One thread runs the loop and owns the socket. It never waits on inference:
while a source waits for its next frame, the loop handles replies and shows
frames (the source's ``wait`` is :meth:`_EdgeRun.handle`). The rules for when
a frame is shown live in :mod:`.pipeline`; this module wires the parts to the
settings and the outputs: a window, an annotated video, JSON-lines events.

A stop (the ``stop`` event, q/Esc in the window) ends the reading of frames,
not the run: the frames already read still get their display delay to collect
their labels, are shown and written, and the outputs are closed, so a stopped
run leaves a playable video, whole event lines and a summary.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zmq

from ..config import EdgeSettings
from ..errors import FerSwarmError
from ..faces import FaceDetector, crop_face, make_detector, to_gray
from ..framing import framing_for
from ..protocol import MAX_CROPS
from ..security import client_security
from ..telemetry import serve
from .client import SwarmClient
from .labels import TrackLabels
from .metrics import EdgeMetrics
from .outputs import Outputs
from .pipeline import UNSENT, FramePipeline, ShownFrame
from .relabel import RelabelBudget
from .sources import Frame, FrameSource, open_source
from .tracks import Tracker

__all__ = ["EdgeProgress", "EdgeSummary", "run_edge", "window_wanted"]

log = logging.getLogger(__name__)

# Latencies kept for the summary's percentiles; beyond this a uniform sample of them.
_LATENCY_SAMPLES = 100_000


@dataclass(frozen=True)
class EdgeSummary:
    """What one edge run did. ``errors`` counts faces shown without a label by error kind, ``labels``
    faces by label; ``unsent`` counts crops the edge could not hand to its socket (no reply will come);
    ``stopped`` is true when a stop request (signal, q/Esc) ended the run before its source did."""

    frames: int
    faces: int
    answered: int
    errors: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    wall_s: float = 0.0
    fps: float = 0.0
    late_replies: int = 0
    tracks: int = 0
    crops_sent: int = 0
    unsent: int = 0
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EdgeProgress:
    """Where a run is, after each frame: ``position`` frames into a source of ``total`` (None if
    unknown, e.g. a camera), ``frames`` processed (fewer than ``position`` when real time skips
    some), ``faces`` seen in them, and the frame rate over the last second."""

    position: int
    total: int | None
    frames: int
    faces: int
    fps: float


class _Stopped(Exception):
    """Raised from inside the loop's waits when the run must end now (stop event, q/Esc)."""


class _Tally:
    def __init__(self) -> None:
        self.frames = self.faces = self.answered = 0
        self.errors: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._seen = 0
        self._rng = random.Random(0)

    def add(self, shown: ShownFrame) -> None:
        self.frames += 1
        for face in shown.faces:
            self.faces += 1
            if face.error is not None:
                self.errors[face.error] += 1
                continue
            self.answered += 1
            self.labels[face.label or ""] += 1
            self._sample(face.latency_ms)

    def _sample(self, latency_ms: float | None) -> None:
        """Reservoir sampling: exact percentiles for short runs, bounded memory for long ones."""
        if latency_ms is None:
            return
        self._seen += 1
        if len(self.latencies) < _LATENCY_SAMPLES:
            self.latencies.append(latency_ms)
        elif (j := self._rng.randrange(self._seen)) < _LATENCY_SAMPLES:
            self.latencies[j] = latency_ms

    def summary(self, wall_s: float, late_replies: int, *, tracks: int, crops_sent: int, unsent: int,
                stopped: bool) -> EdgeSummary:
        p50 = p95 = None
        if self.latencies:
            p50, p95 = (round(float(v), 2) for v in np.percentile(self.latencies, [50, 95]))
        return EdgeSummary(
            frames=self.frames, faces=self.faces, answered=self.answered,
            errors=dict(self.errors), labels=dict(self.labels),
            latency_p50_ms=p50, latency_p95_ms=p95, wall_s=round(wall_s, 3),
            fps=round(self.frames / wall_s, 2) if wall_s > 0 else 0.0, late_replies=late_replies,
            tracks=tracks, crops_sent=crops_sent, unsent=unsent, stopped=stopped,
        )


def edge_detector(settings: EdgeSettings) -> FaceDetector:
    """The face detector the settings ask for, with each detector's own defaults where they are unset."""
    kwargs = {"model": settings.yunet_model} if settings.yunet_model is not None else {}
    return make_detector(settings.detector, detect_width_px=settings.detect_width_px, min_face_px=settings.min_face_px,
                         score_threshold=settings.score_threshold, nms_threshold=settings.nms_threshold, **kwargs)


def window_wanted(settings: EdgeSettings) -> bool:
    """``show`` if given; otherwise a window only when no headless output is asked for."""
    if settings.show is not None:
        return settings.show
    return settings.output is None and settings.events is None


def _require_display() -> None:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise FerSwarmError(
            "no display to open a window on (DISPLAY and WAYLAND_DISPLAY are unset): "
            "pass --output annotated.mp4 and/or --events events.jsonl to run headless"
        )


class _EdgeRun:
    """The state of one run: the loop's steps as methods over its parts."""

    def __init__(self, settings: EdgeSettings, client: SwarmClient, pipeline: FramePipeline,
                 detector: FaceDetector, outputs: Outputs, stop: threading.Event, metrics: EdgeMetrics,
                 *, realtime: bool):
        self.settings = settings
        self.client = client
        self.pipeline = pipeline
        self.detector = detector
        self.outputs = outputs
        self.stop = stop
        self.metrics = metrics
        self.realtime = realtime
        model = client.welcome.model  # type: ignore[union-attr]
        self.crop_size = (model.width_px, model.height_px)
        # The pool's model says how it wants this detector's boxes framed.
        self.framing = framing_for(model.framing, getattr(detector, "name", ""))
        self.tracker = Tracker(keep_ms=settings.track_keep_ms, hold_ms=settings.track_hold_ms,
                               enabled=settings.tracking)
        self.budget = RelabelBudget(settings.relabel_ms)
        self.crops_sent = self.unsent = 0
        self.faces_seen = 0
        self.tally = _Tally()
        self._flushing = False

    def process(self, frame: Frame) -> None:
        """Detect, track and crop one frame's faces, send those the budget allows; hold the frame until shown."""
        if not self.realtime:
            # Off real time nothing is lost by waiting, so give the oldest frame its
            # full display delay instead of showing it early to make room.
            while len(self.pipeline) >= self.settings.max_pending_frames:
                self.handle(self.pipeline.seconds_until_due(time.monotonic()) or 0.0)
        self._check_stop()  # a frame read after the stop is not processed
        began = time.monotonic()
        t = frame.time_s
        faces = self.detector.detect(frame.bgr)[: self.settings.max_faces]
        tracks = self.tracker.update(faces, t)
        send = [self.budget.due(tr, t) for tr in tracks]
        ids = self.pipeline.add_frame(frame.index, t, frame.bgr, tracks, send, time.monotonic())
        self.pipeline.forget_tracks({tr.id for tr in self.tracker.tracks})
        chosen = [tr for tr, s in zip(tracks, send) if s]
        if chosen:
            gray = to_gray(frame.bgr)
            crops = [crop_face(gray, tr.face, self.crop_size, self.framing) for tr in chosen]
            for tr in chosen:
                self.budget.sent(tr, t)
            for start in range(0, len(ids), MAX_CROPS):  # the frame's faces in one JOB, if they fit
                part = ids[start:start + MAX_CROPS]
                if self.client.send_job(part, crops[start:start + MAX_CROPS], self.settings.deadline_ms):
                    now = time.monotonic()
                    self.pipeline.sent(part, now)
                    self.metrics.sent(part, now)
                    self.crops_sent += len(part)
                else:
                    self.pipeline.failed(part, UNSENT, "the socket to the broker would block")
                    self.metrics.unsent(len(part))
                    self.unsent += len(part)
        self.faces_seen += len(tracks)
        self.metrics.frame(len(tracks), time.monotonic() - began)
        log.debug("frame %d: %d face(s), %d sent", frame.index, len(tracks), len(chosen))
        self.handle(0.0)

    def handle(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for replies, match them, show the frames that are due.
        Also the sources' ``wait``: time spent waiting for a frame goes to replies."""
        self._check_stop()
        due = self.pipeline.seconds_until_due(time.monotonic())
        if due is not None:
            timeout_s = min(timeout_s, due)
        replies = self.client.poll_replies(math.ceil(max(0.0, timeout_s) * 1000))
        now = time.monotonic()
        for reply in replies:
            self.pipeline.on_reply(reply, now)
            self.metrics.replied(reply, now)
        self._show(self.pipeline.ready(now))

    def drain(self) -> None:
        """After the last frame (or a stop): give the held frames their display delay to collect
        their labels, then show them. A stop does not cut this short: it is bounded by the delay."""
        self._flushing = True
        while len(self.pipeline):
            self.handle(self.pipeline.seconds_until_due(time.monotonic()) or 0.0)
        self._show(self.pipeline.flush())

    def _check_stop(self) -> None:
        if not self._flushing and (self.stop.is_set() or self.outputs.quit):
            raise _Stopped

    def _show(self, frames: list[ShownFrame]) -> None:
        for shown in frames:
            self.tally.add(shown)
            self.outputs.show(shown)
            log.debug("frame %d shown: %d of %d face(s) labelled", shown.index,
                      sum(f.answered for f in shown.faces), len(shown.faces))


def _frame_count(source: FrameSource, max_frames: int) -> int | None:
    """How many frames the run will read, if known: a file's frame count, capped by ``max_frames``."""
    count = getattr(source, "frame_count", None)
    if count is None:
        return max_frames or None
    return min(count, max_frames) if max_frames else count


def run_edge(
    settings: EdgeSettings,
    *,
    context: zmq.Context | None = None,
    stop: threading.Event | None = None,
    source: FrameSource | None = None,
    detector: FaceDetector | None = None,
    metrics: EdgeMetrics | None = None,
    progress: Callable[[EdgeProgress], None] | None = None,
) -> EdgeSummary:
    """Run the edge until the source ends, ``max_frames`` frames, ``stop`` is set, or q/Esc in the window.

    A stop ends the reading of frames; the frames already read are still
    given their display delay, shown and written, and the outputs closed,
    before the summary is returned. ``metrics`` (made here if not given) is
    served on ``settings.metrics_port`` when that is not 0; ``progress`` is
    called after each frame. ``source`` and ``context`` given by the caller
    stay the caller's to close; the ones made here from ``settings`` are
    closed here. Raises FerSwarmError for a missing display, an unreadable
    source, an unwritable output, a metrics port that cannot be bound, or a
    broker that does not announce a model within ``connect_timeout_s``.
    """
    curve = client_security(settings, settings.broker)  # key problems fail here, before any frame is read
    detector = detector or edge_detector(settings)  # and a missing detector model
    window = window_wanted(settings)
    if window:
        _require_display()
    metrics = metrics if metrics is not None else EdgeMetrics()
    own_source = source is None
    if source is None:
        source = open_source(camera=settings.camera, video=settings.video, images=settings.images,
                             realtime=settings.realtime)
    ctx = context if context is not None else zmq.Context()
    stop = stop or threading.Event()
    started = time.monotonic()
    stopped = False
    endpoint = None
    try:
        endpoint = serve(metrics.registry, settings.metrics_port, settings.metrics_host)
        stream = settings.stream or f"{source.kind}-{os.getpid()}"
        # Jobs wait in the socket only while the broker is out of reach; a job older than the frames
        # held for display is stale, so the queue is that deep and no deeper (past it: UNSENT).
        hwm = max(16, 4 * settings.max_pending_frames * math.ceil(settings.max_faces / MAX_CROPS))
        client = SwarmClient(ctx, settings.broker, name=f"fer-swarm edge {stream}", hwm=hwm,
                             connect_timeout_s=settings.connect_timeout_s, curve=curve)
        try:  # the client first: an endpoint it cannot use then leaves no output file open
            outputs = Outputs(settings, window=window, fps=source.fps)
        except BaseException:
            client.close()
            raise
        try:
            welcome = client.connect()
            model = welcome.model
            assert model is not None
            if model.width_px * model.height_px > welcome.max_payload_bytes:
                raise FerSwarmError(f"the pool's {model.width_px}x{model.height_px} crops exceed the broker's "
                                    f"{welcome.max_payload_bytes}-byte payload limit")
            realtime = source.realtime
            log.info("edge started: %s source, stream %s, broker %s, model %s, %s", source.kind, stream,
                     settings.broker, model.ref, "real time" if realtime else "every frame")
            labels = TrackLabels(model.labels, smoothing=settings.smoothing, memory_ms=settings.label_memory_ms,
                                 answer_weight=settings.answer_weight, switch_margin=settings.label_switch_margin)
            pipeline = FramePipeline(stream, labels, display_delay_ms=settings.display_delay_ms,
                                     max_pending_frames=settings.max_pending_frames)
            run = _EdgeRun(settings, client, pipeline, detector, outputs, stop, metrics, realtime=realtime)
            total = _frame_count(source, settings.max_frames)
            started = time.monotonic()
            frames = source.frames(wait=run.handle)
            try:
                for n, frame in enumerate(frames, start=1):
                    run.process(frame)
                    if progress is not None:  # with max_frames, progress counts toward it
                        position = n if settings.max_frames else frame.index + 1
                        progress(EdgeProgress(position=position, total=total, frames=n,
                                              faces=run.faces_seen, fps=metrics.rate.per_second()))
                    if settings.max_frames and n >= settings.max_frames:
                        break
            except _Stopped:
                stopped = True
                log.info("edge stopping: %s; showing the %d frame(s) in hand",
                         "quit from the window" if outputs.quit else "stop requested", len(pipeline))
            finally:
                frames.close()
            run.drain()
        finally:
            try:
                client.close()
            finally:
                outputs.close()
    finally:
        try:
            if own_source:
                source.close()
            if context is None:
                ctx.term()
        finally:
            if endpoint is not None:
                endpoint.close()
    summary = run.tally.summary(time.monotonic() - started, pipeline.late_replies, tracks=run.tracker.started,
                                crops_sent=run.crops_sent, unsent=run.unsent, stopped=stopped)
    log.info("edge finished: %d frames, %d faces, %d labelled, errors %s, %d crop(s) unsent, "
             "latency p50 %s ms p95 %s ms, %.1f fps", summary.frames, summary.faces, summary.answered,
             summary.errors or "none", summary.unsent, summary.latency_p50_ms, summary.latency_p95_ms, summary.fps)
    return summary
