"""The edge program: capture -> detect -> track -> (relabel budget) -> crop -> one JOB per frame ->
match replies -> smooth labels -> draw -> output.

One thread runs the loop and owns the socket. It never waits on inference:
while a source waits for its next frame, the loop handles replies and shows
frames (the source's ``wait`` is :meth:`_EdgeRun.handle`). The rules for when
a frame is shown live in :mod:`.pipeline`; this module wires the parts to the
settings and the outputs: a window, an annotated video, JSON-lines events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import cv2
import numpy as np
import zmq

from ..config import EdgeSettings
from ..errors import FerSwarmError
from ..faces import FaceDetector, crop_face, make_detector, to_gray
from ..framing import framing_for
from ..protocol import MAX_CROPS
from ..security import client_security
from .client import SwarmClient
from .draw import draw_faces
from .labels import TrackLabels
from .pipeline import UNSENT, FramePipeline, ShownFrame
from .relabel import RelabelBudget
from .sources import Frame, FrameSource, open_source
from .tracks import Tracker

__all__ = ["EdgeSummary", "run_edge", "window_wanted"]

log = logging.getLogger(__name__)

WINDOW_TITLE = "fer-swarm edge (q or Esc to quit)"
DEFAULT_FPS = 30.0
# Latencies kept for the summary's percentiles; beyond this a uniform sample of them.
_LATENCY_SAMPLES = 100_000


@dataclass(frozen=True)
class EdgeSummary:
    """What one edge run did. ``errors`` counts faces by error kind, ``labels`` by label."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def summary(self, wall_s: float, late_replies: int, *, tracks: int, crops_sent: int) -> EdgeSummary:
        p50 = p95 = None
        if self.latencies:
            p50, p95 = (round(float(v), 2) for v in np.percentile(self.latencies, [50, 95]))
        return EdgeSummary(
            frames=self.frames, faces=self.faces, answered=self.answered,
            errors=dict(self.errors), labels=dict(self.labels),
            latency_p50_ms=p50, latency_p95_ms=p95, wall_s=round(wall_s, 3),
            fps=round(self.frames / wall_s, 2) if wall_s > 0 else 0.0, late_replies=late_replies,
            tracks=tracks, crops_sent=crops_sent,
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


class _Outputs:
    """Window, annotated video and events file; each optional."""

    def __init__(self, settings: EdgeSettings, *, window: bool, fps: float | None):
        self.settings = settings
        self.window = window
        self.fps = fps or DEFAULT_FPS
        self.quit = False
        self._sized = False
        self._writer: cv2.VideoWriter | None = None
        self._events: IO[str] | None = None
        if settings.events is not None:
            try:
                self._events = open(settings.events, "w", encoding="utf-8")
            except OSError as e:
                raise FerSwarmError(f"cannot write events to {settings.events}: {e.strerror}") from e
        if window:
            cv2.namedWindow(WINDOW_TITLE, cv2.WINDOW_NORMAL)

    def show(self, shown: ShownFrame) -> None:
        if self._events is not None:
            for record in shown.events():
                self._events.write(json.dumps(record) + "\n")
            self._events.flush()  # a line per face as it happens, for `tail -f` consumers
        if not (self.window or self.settings.output is not None):
            return
        image = draw_faces(shown.image, shown.faces, second_label_threshold=self.settings.second_label_threshold)
        if self.settings.output is not None:
            self._write(image)
        if self.window:
            if not self._sized:  # WINDOW_NORMAL opens small; show frames at their own size until the user resizes
                cv2.resizeWindow(WINDOW_TITLE, image.shape[1], image.shape[0])
                self._sized = True
            cv2.imshow(WINDOW_TITLE, image)
            key = cv2.waitKey(1) & 0xFF
            if key in (ord("q"), 27) or cv2.getWindowProperty(WINDOW_TITLE, cv2.WND_PROP_VISIBLE) < 1:
                self.quit = True

    def _write(self, image: np.ndarray) -> None:
        if self._writer is None:
            height, width = image.shape[:2]
            path = str(self.settings.output)
            self._writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self._writer.isOpened():
                raise FerSwarmError(f"cannot write video to {path} (mp4v); does its folder exist?")
        self._writer.write(image)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        if self._writer is not None:
            self._writer.release()
        if self.window:
            cv2.destroyWindow(WINDOW_TITLE)
            cv2.waitKey(1)  # lets HighGUI actually close the window


class _EdgeRun:
    """The state of one run: the loop's steps as methods over its parts."""

    def __init__(self, settings: EdgeSettings, client: SwarmClient, pipeline: FramePipeline,
                 detector: FaceDetector, outputs: _Outputs, stop: threading.Event, *, realtime: bool):
        self.settings = settings
        self.client = client
        self.pipeline = pipeline
        self.detector = detector
        self.outputs = outputs
        self.stop = stop
        self.realtime = realtime
        model = client.welcome.model  # type: ignore[union-attr]
        self.crop_size = (model.width_px, model.height_px)
        # The pool's model says how it wants this detector's boxes framed.
        self.framing = framing_for(model.framing, getattr(detector, "name", ""))
        self.tracker = Tracker(keep_ms=settings.track_keep_ms, hold_ms=settings.track_hold_ms,
                               enabled=settings.tracking)
        self.budget = RelabelBudget(settings.relabel_ms)
        self.crops_sent = 0
        self.tally = _Tally()

    def process(self, frame: Frame) -> None:
        """Detect, track and crop one frame's faces, send those the budget allows; hold the frame until shown."""
        if not self.realtime:
            # Off real time nothing is lost by waiting, so give the oldest frame its
            # full display delay instead of showing it early to make room.
            while len(self.pipeline) >= self.settings.max_pending_frames:
                self.handle(self.pipeline.seconds_until_due(time.monotonic()) or 0.0)
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
                    self.pipeline.sent(part, time.monotonic())
                    self.crops_sent += len(part)
                else:
                    self.pipeline.failed(part, UNSENT, "the socket to the broker would block")
        log.debug("frame %d: %d face(s), %d sent", frame.index, len(tracks), len(chosen))
        self.handle(0.0)

    def handle(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for replies, match them, show the frames that are due.
        Also the sources' ``wait``: time spent waiting for a frame goes to replies."""
        if self.stop.is_set() or self.outputs.quit:
            raise _Stopped
        due = self.pipeline.seconds_until_due(time.monotonic())
        if due is not None:
            timeout_s = min(timeout_s, due)
        replies = self.client.poll_replies(math.ceil(max(0.0, timeout_s) * 1000))
        now = time.monotonic()
        for reply in replies:
            self.pipeline.on_reply(reply, now)
        self._show(self.pipeline.ready(now))

    def drain(self) -> None:
        """After the last frame: give the held frames their display delay, then show them."""
        try:
            while len(self.pipeline):
                self.handle(self.pipeline.seconds_until_due(time.monotonic()) or 0.0)
        except _Stopped:
            pass
        self.client.poll_replies(0)
        self._show(self.pipeline.flush())

    def _show(self, frames: list[ShownFrame]) -> None:
        for shown in frames:
            self.tally.add(shown)
            self.outputs.show(shown)
            log.debug("frame %d shown: %d of %d face(s) labelled", shown.index,
                      sum(f.answered for f in shown.faces), len(shown.faces))


def run_edge(
    settings: EdgeSettings,
    *,
    context: zmq.Context | None = None,
    stop: threading.Event | None = None,
    source: FrameSource | None = None,
    detector: FaceDetector | None = None,
) -> EdgeSummary:
    """Run the edge until the source ends, ``max_frames`` frames, ``stop`` is set, or q/Esc in the window.

    ``source`` and ``context`` given by the caller stay the caller's to close;
    the ones made here from ``settings`` are closed here. Raises FerSwarmError
    for a missing display, an unreadable source, an unwritable output, or a
    broker that does not announce a model within ``connect_timeout_s``.
    """
    curve = client_security(settings, settings.broker)  # key problems fail here, before any frame is read
    detector = detector or edge_detector(settings)  # and a missing detector model
    window = window_wanted(settings)
    if window:
        _require_display()
    own_source = source is None
    if source is None:
        source = open_source(camera=settings.camera, video=settings.video, images=settings.images,
                             realtime=settings.realtime)
    ctx = context if context is not None else zmq.Context()
    stop = stop or threading.Event()
    started = time.monotonic()
    try:
        stream = settings.stream or f"{source.kind}-{os.getpid()}"
        outputs = _Outputs(settings, window=window, fps=source.fps)
        client = SwarmClient(ctx, settings.broker, name=f"fer-swarm edge {stream}",
                             connect_timeout_s=settings.connect_timeout_s, curve=curve)
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
            run = _EdgeRun(settings, client, pipeline, detector, outputs, stop, realtime=realtime)
            started = time.monotonic()
            frames = source.frames(wait=run.handle)
            try:
                for n, frame in enumerate(frames, start=1):
                    run.process(frame)
                    if settings.max_frames and n >= settings.max_frames:
                        break
            except _Stopped:
                log.info("edge stopping: %s", "quit from the window" if outputs.quit else "stop requested")
            finally:
                frames.close()
            run.drain()
        finally:
            client.close()
            outputs.close()
    finally:
        if own_source:
            source.close()
        if context is None:
            ctx.term()
    summary = run.tally.summary(time.monotonic() - started, pipeline.late_replies,
                                tracks=run.tracker.started, crops_sent=run.crops_sent)
    log.info("edge finished: %d frames, %d faces, %d labelled, errors %s, latency p50 %s ms p95 %s ms, %.1f fps",
             summary.frames, summary.faces, summary.answered, summary.errors or "none",
             summary.latency_p50_ms, summary.latency_p95_ms, summary.fps)
    return summary
