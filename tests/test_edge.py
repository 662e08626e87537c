"""The edge client: real OpenCV on a real sample clip, real ZeroMQ sockets on 127.0.0.1.

The broker side is a small ROUTER in a thread that speaks the real protocol:
it answers HELLO with WELCOME and each JOB with one reply, jobs in reverse
order of arrival and the faces of a RESULT in reverse order of the JOB's ids,
with a label derived from each face's correlation id and a worker name from
the job's ids, so a reply matched to the wrong face is visible. The only fake
is a camera (and, in one test, a detector that finds more faces than fit in a JOB).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pytest
import zmq

from fer_swarm.config import EdgeSettings
from fer_swarm.edge.app import run_edge
from fer_swarm.edge.client import SwarmClient
from fer_swarm.edge.draw import draw_faces, label_text
from fer_swarm.edge.pipeline import TIMEOUT, UNSENT, FaceOutcome, FramePipeline
from fer_swarm.edge.sources import CameraSource, ImageFolderSource, VideoSource, open_source
from fer_swarm.errors import FerSwarmError, TransportError
from fer_swarm.edge.labels import TrackLabels
from fer_swarm.edge.tracks import Track
from fer_swarm.faces import Box, Face, crop_face, to_gray
from fer_swarm.framing import DEFAULT_FRAMINGS
from fer_swarm.protocol import (
    MAX_CROPS, Busy, CorrelationId, Error, Expired, FaceResult, Heartbeat, Job, ModelInfo, Result, Welcome,
    decode_routed, encode_routed,
)
from fer_swarm.samples import read_clip, sample_clip

LABELS = ("angry", "happy", "neutral", "sad", "surprise")
# Not square, so a crop made as (height, width) instead of (width, height) is caught.
MODEL = ModelInfo(name="test", version="1", input_shape=(1, 48, 40, 1), labels=LABELS, width_px=40, height_px=48)


def label_for(id: CorrelationId) -> str:
    return LABELS[(2 * id.frame + id.face) % len(LABELS)]  # faces 0 and 1 of a frame always differ


def worker_for(ids: Sequence[CorrelationId]) -> str:
    """The worker named in the RESULT for a job of ``ids``: one per job, so it tells jobs apart."""
    return f"w{ids[0].frame}-{ids[0].face}x{len(ids)}"


def face_result(id: CorrelationId) -> FaceResult:
    top = label_for(id)
    second = LABELS[(LABELS.index(top) + 1) % len(LABELS)]
    probs = {name: 0.025 for name in LABELS} | {top: 0.6, second: 0.325}
    return FaceResult(id=id, label=top, probabilities=probs, inference_ms=1.0)


def result_for(ids: Sequence[CorrelationId]) -> Result:
    """One RESULT for all of ``ids``, its faces listed last first: matching must go by id, not position."""
    return Result(model=MODEL.ref, worker=worker_for(ids), faces=tuple(face_result(i) for i in reversed(ids)))


# A job the router holds for a batch (``gather``) is answered anyway after this much longer.
STRAGGLER_S = 0.3


class Router(threading.Thread):
    """A stand-in broker frontend: real ROUTER socket, real protocol, bounded life.

    ``answer(job)`` makes each job's one reply (default: the RESULT ``result_for`` gives);
    ``hold_s`` keeps jobs that long before answering; jobs answered together are
    answered last first. ``gather`` holds due jobs until that many are due (or the
    first has waited STRAGGLER_S more), so jobs sent apart still come back reversed.
    """

    def __init__(self, ctx: zmq.Context, *, model: ModelInfo | None = MODEL, answer=None, hold_s: float = 0.0,
                 gather: int = 1, max_life_s: float = 60.0):
        super().__init__(name="test-router", daemon=True)
        self.ctx, self.model, self.hold_s, self.gather, self.max_life_s = ctx, model, hold_s, gather, max_life_s
        self.answer = answer or (lambda job: result_for(job.ids))
        self.jobs: list[Job] = []
        self.job_frames: list[int] = []  # frames of each JOB as it came off the wire, routing identity not counted
        self.answered_order: list[tuple] = []
        self.reversed_batches = 0
        self.hellos = 0
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.endpoint = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        try:
            sock.bind("tcp://127.0.0.1:0")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.ready.set()
            held: list[tuple[float, bytes, Job]] = []
            end = time.monotonic() + self.max_life_s
            while not self.stopping.is_set() and time.monotonic() < end:
                if sock.poll(5, zmq.POLLIN):
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on(sock, frames, held)
                    continue  # answer only once a burst is over, so bursts come back reversed
                now = time.monotonic()
                due = [h for h in held if now - h[0] >= self.hold_s]
                if not due:
                    continue
                if len(due) < self.gather and now - due[0][0] < self.hold_s + STRAGGLER_S:
                    continue
                held[:] = [h for h in held if now - h[0] < self.hold_s]
                if len(due) > 1:
                    self.reversed_batches += 1
                for _, identity, job in reversed(due):
                    self.answered_order.append(tuple(i.key() for i in job.ids))
                    sock.send_multipart(encode_routed(identity, self.answer(job)))
        except BaseException as e:  # surfaced by the fixture, not lost in the thread
            self.error = e
            self.ready.set()
        finally:
            sock.close(linger=0)

    def _on(self, sock, frames, held) -> None:
        identity, msg = decode_routed(frames)
        if msg.command.value == "HELLO":
            self.hellos += 1
            sock.send_multipart([identity, b"junk"])  # malformed: the client must drop it and carry on
            welcome = Welcome(model=self.model, workers=1 if self.model else 0,
                              max_payload_bytes=1 << 20, heartbeat_interval_s=1.0, max_deadline_ms=10000,
                              max_queue_jobs=200, max_queue_bytes=4 << 20)
            sock.send_multipart(encode_routed(identity, welcome))
        elif isinstance(msg, Heartbeat):
            sock.send_multipart(encode_routed(identity, Heartbeat()))
        elif isinstance(msg, Job):
            self.jobs.append(msg)
            self.job_frames.append(len(frames) - 1)
            held.append((time.monotonic(), identity, msg))


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def make_router(ctx):
    routers: list[Router] = []

    def make(**kw) -> Router:
        router = Router(ctx, **kw)
        router.start()
        routers.append(router)
        assert router.ready.wait(5), "router did not start"
        assert router.error is None, router.error
        return router

    yield make
    for router in routers:
        router.stopping.set()
        router.join(5)
        assert not router.is_alive()
        assert router.error is None, router.error


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return sample_clip(tmp_path_factory.mktemp("edge") / "clip.mp4", frames=16, faces=2, fps=15, seed=3)


def cid(frame: int, face: int, stream: str = "s") -> CorrelationId:
    return CorrelationId(stream=stream, frame=frame, face=face)


def boxes(n: int) -> list[Box]:
    return [Box(10 + 60 * i, 10, 50, 50) for i in range(n)]


def tracks(n: int) -> list[Track]:
    """``n`` tracks with ids 0..n-1 at the ``boxes(n)``: face k of every frame is track k."""
    return [Track(id=k, face=Face(b), born_s=0.0, seen_s=0.0, box=b) for k, b in enumerate(boxes(n))]


def pipeline(**kwargs) -> FramePipeline:
    """A pipeline showing each track's latest answer (no smoothing): the matching rules alone."""
    return FramePipeline("s", TrackLabels(LABELS, smoothing=False), **kwargs)


def add(p: FramePipeline, index: int, time_s: float, n: int, *, now: float, send=None) -> list[CorrelationId]:
    """Add frame ``index`` with ``n`` tracks, all of them sent unless ``send`` says otherwise."""
    return p.add_frame(index, time_s, IMAGE, tracks(n), [True] * n if send is None else send, now=now)


IMAGE = np.zeros((120, 200, 3), np.uint8)


# ---------------------------------------------------------------- pipeline


def test_replies_in_any_order_reach_their_own_face():
    p = pipeline(display_delay_ms=150, max_pending_frames=8)
    frames = [add(p, n, n / 15, 3, now=0.0) for n in range(3)]
    for ids in frames:
        p.sent(ids, now=0.001)
    # Replies of any size, in any order, their faces in any order: faces 0+2 of each frame, then face 1.
    replies = [result_for([ids[0], ids[2]]) for ids in frames] + [result_for([ids[1]]) for ids in frames]
    random.Random(4).shuffle(replies)
    assert [p.on_reply(r, now=0.021) for r in replies] == [len(r.faces) for r in replies]
    shown = p.ready(now=0.022)  # all answered: no need to wait for the display delay
    assert [s.index for s in shown] == [0, 1, 2] and len(p) == 0
    for s in shown:
        for k, face in enumerate(s.faces):
            assert face.id == cid(s.index, k)
            assert face.box == boxes(3)[k]
            job = [cid(s.index, 1)] if k == 1 else [cid(s.index, 0), cid(s.index, 2)]
            # Its own answer, and the track's label: the answer to its newest frame (2), whatever the order.
            assert (face.raw_label, face.worker, face.error) == (label_for(face.id), worker_for(job), None)
            assert face.raw_probabilities[face.raw_label] == 0.6
            assert face.label == label_for(cid(2, k)) and face.track == k and face.sent
            assert face.latency_ms == pytest.approx(20.0)
    assert p.late_replies == 0


def test_a_result_answering_two_faces_of_a_frame_labels_both():
    p = pipeline(display_delay_ms=150)
    a, b = add(p, 3, 0.2, 2, now=5.0)
    p.sent([a, b], now=5.0)
    reply = result_for([a, b])
    assert [f.id for f in reply.faces] == [b, a]  # listed the other way round
    assert p.on_reply(reply, now=5.04) == 2
    (shown,) = p.ready(now=5.04)  # complete: shown before the display delay
    assert [(f.id, f.label, f.worker, f.error) for f in shown.faces] == [
        (a, label_for(a), worker_for([a, b]), None), (b, label_for(b), worker_for([a, b]), None)]
    assert label_for(a) != label_for(b)
    assert [f.latency_ms for f in shown.faces] == pytest.approx([40.0, 40.0])
    assert p.late_replies == 0


def test_a_reply_mixing_a_waiting_and_an_answered_face_counts_one_late_reply():
    p = pipeline(display_delay_ms=150)
    a, b = add(p, 0, 0.0, 2, now=0.0)
    p.sent([a, b], now=0.0)
    assert p.on_reply(Busy(ids=(a,), reason="queue full"), now=0.01) == 1
    assert p.on_reply(result_for([a, b]), now=0.02) == 1  # b is answered; a already had its reply
    assert p.late_replies == 1
    (shown,) = p.ready(now=0.02)
    assert [(f.error, f.label) for f in shown.faces] == [("BUSY", None), (None, label_for(b))]
    assert shown.faces[0].reason == "queue full"  # the first reply stands


def test_a_frame_waits_for_its_delay_then_shows_what_arrived_and_late_replies_are_dropped():
    p = pipeline(display_delay_ms=150, max_pending_frames=8)
    a, b = add(p, 0, 0.0, 2, now=10.0)
    p.sent([a, b], 10.0)
    assert p.on_reply(result_for([b]), now=10.05) == 1
    assert p.ready(now=10.1) == [] and p.seconds_until_due(10.1) == pytest.approx(0.05)
    (shown,) = p.ready(now=10.15)
    assert shown.faces[0].error == TIMEOUT and shown.faces[0].label is None and shown.faces[0].latency_ms is None
    assert shown.faces[1].label == label_for(b)
    assert p.on_reply(result_for([a]), now=10.2) == 0  # its frame is gone: late, dropped
    assert p.on_reply(result_for([cid(99, 0)]), now=10.2) == 0  # never sent
    assert p.on_reply(result_for([cid(0, 0, stream="other")]), now=10.2) == 0
    assert p.late_replies == 3 and p.seconds_until_due(10.2) is None
    assert p.on_reply(Expired(ids=(a, b), reason="deadline"), now=10.3) == 0  # each face of a reply counts
    assert p.late_replies == 5


def test_frames_are_shown_in_capture_order():
    p = pipeline(display_delay_ms=100, max_pending_frames=8)
    (a,) = add(p, 0, 0.0, 1, now=0.0)
    (b,) = add(p, 1, 0.1, 1, now=0.05)
    assert p.on_reply(result_for([b]), now=0.06) == 1  # the newer frame is complete first ...
    assert p.ready(now=0.07) == []  # ... but does not overtake the older one
    assert p.on_reply(result_for([a]), now=0.08) == 1
    assert [s.index for s in p.ready(now=0.08)] == [0, 1]
    with pytest.raises(ValueError):
        p.add_frame(1, 0.2, IMAGE, [], [], now=0.1)


def test_error_replies_are_recorded_with_kind_reason_and_latency():
    p = pipeline(display_delay_ms=150)
    ids = add(p, 0, 0.0, 6, now=0.0)
    p.sent(ids[:4], 0.0)
    assert p.on_reply(Busy(ids=(ids[0],), reason="queue full (200 jobs)"), now=0.002) == 1
    assert p.on_reply(Expired(ids=(ids[1], ids[3]), reason="deadline passed in queue"), now=0.25) == 2
    assert p.on_reply(Error(ids=(ids[2],), reason="payload is 3 bytes"), now=0.01) == 1
    assert p.on_reply(Error(ids=(ids[2],), reason="again"), now=0.01) == 0  # a face gets one reply
    assert p.late_replies == 1
    p.failed(ids[4:], UNSENT, "socket full")
    (shown,) = p.ready(now=0.3)
    kinds = [(f.error, f.reason) for f in shown.faces]
    assert kinds == [("BUSY", "queue full (200 jobs)"), ("EXPIRED", "deadline passed in queue"),
                     ("ERROR", "payload is 3 bytes"), ("EXPIRED", "deadline passed in queue"),
                     (UNSENT, "socket full"), (UNSENT, "socket full")]
    assert [f.latency_ms for f in shown.faces] == pytest.approx([2.0, 250.0, 10.0, 250.0, None, None])
    assert all(f.label is None and f.probabilities is None for f in shown.faces)


def test_a_reply_without_ids_is_logged_and_dropped(caplog):
    p = pipeline()
    add(p, 0, 0.0, 1, now=0.0)
    with caplog.at_level(logging.WARNING, logger="fer_swarm.edge.pipeline"):
        assert p.on_reply(Error(ids=(), reason="unreadable header"), now=0.01) == 0
    assert "unreadable header" in caplog.text and p.late_replies == 1  # counted once, not per face
    assert len(p) == 1 and p.ready(now=0.01) == []  # the waiting face is still waiting


def test_pending_frames_are_bounded_oldest_shown_first():
    p = pipeline(display_delay_ms=10_000, max_pending_frames=2)
    for n in range(4):
        add(p, n, n / 30, 1, now=n / 30)
        shown = p.ready(now=n / 30)
        assert len(p) <= 2
        if n >= 2:
            assert [s.index for s in shown] == [n - 2]
            assert shown[0].faces[0].error == TIMEOUT
    assert [s.index for s in p.flush()] == [2, 3] and len(p) == 0


def test_frames_without_faces_are_shown_at_once():
    p = pipeline(display_delay_ms=150)
    assert p.add_frame(0, 0.0, IMAGE, [], [], now=0.0) == []
    (shown,) = p.ready(now=0.0)
    assert shown.faces == () and shown.events() == []


def test_event_records_follow_the_schema():
    p = pipeline(display_delay_ms=150)
    a, b = add(p, 7, 0.4667, 2, now=0.0)
    p.sent([a], 0.0)
    p.on_reply(result_for([a]), now=0.0123)
    (shown,) = p.ready(now=1.0)
    good, bad = (json.loads(json.dumps(e)) for e in shown.events())
    keys = {"frame", "time_s", "track", "box", "landmarks", "label", "probabilities", "sent", "raw_label",
            "raw_probabilities", "latency_ms", "worker", "error", "job_error"}
    assert set(good) == keys and set(bad) == keys
    assert good["frame"] == 7 and good["time_s"] == 0.4667 and good["box"] == [10, 10, 50, 50]
    assert (good["track"], bad["track"]) == (0, 1) and good["landmarks"] is None
    assert good["label"] == good["raw_label"] == label_for(a) and good["probabilities"][label_for(a)] == 0.6
    assert good["raw_probabilities"] == good["probabilities"] and good["sent"] and good["job_error"] is None
    assert good["latency_ms"] == pytest.approx(12.3) and good["worker"] == worker_for([a]) and good["error"] is None
    assert bad["box"] == [70, 10, 50, 50]
    assert (bad["label"], bad["probabilities"], bad["latency_ms"], bad["worker"], bad["error"], bad["job_error"]) == (
        None, None, None, None, TIMEOUT, TIMEOUT)


# ---------------------------------------------------------------- drawing


def outcome(probs: dict[str, float] | None, box=Box(60, 50, 60, 60), error=None) -> FaceOutcome:
    label = max(probs, key=probs.get) if probs else None
    return FaceOutcome(id=cid(0, 0), box=box, label=label, probabilities=probs, worker="w" if probs else None,
                       error=error)


BLEND = {"happy": 0.55, "sad": 0.3, "angry": 0.15}


def test_label_text_top_and_second_by_threshold():
    assert label_text(outcome(BLEND), 0.25) == "happy 0.55 / sad 0.30"
    assert label_text(outcome(BLEND), 0.35) == "happy 0.55"
    assert label_text(outcome(BLEND), 0.3) == "happy 0.55 / sad 0.30"  # at the threshold counts
    assert label_text(outcome(None, error=TIMEOUT), 0.25) == "TIMEOUT"
    assert label_text(outcome(None, error="BUSY"), 0.25) == "BUSY"


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=2)


def test_draw_marks_the_box_and_writes_the_label_above_it():
    frame = np.full((240, 320, 3), 128, np.uint8)
    out = draw_faces(frame, [outcome(BLEND)], second_label_threshold=0.25)
    diff = changed(frame, out)
    assert frame.max() == 128  # the input is not drawn on
    assert diff[50:110, 60].all() and diff[50, 60:120].all()  # the box's left and top edges
    assert not diff[60:100, 70:110].any()  # the face itself stays visible
    assert diff[30:50, 60:120].mean() > 0.3  # the tag above the box


def test_second_label_appears_only_at_or_above_the_threshold():
    frame = np.full((240, 320, 3), 128, np.uint8)
    with_second = changed(frame, draw_faces(frame, [outcome(BLEND)], second_label_threshold=0.25))
    top_only = changed(frame, draw_faces(frame, [outcome(BLEND)], second_label_threshold=0.35))
    band = slice(30, 49)  # the tag's rows, above the box
    right_edge = lambda mask: np.nonzero(mask[band].any(axis=0))[0].max()  # noqa: E731
    assert right_edge(with_second) > right_edge(top_only) + 30
    assert (with_second[53:] == top_only[53:]).all()  # below the tag, the box is the same either way


def test_faces_without_a_label_look_different():
    frame = np.full((240, 320, 3), 128, np.uint8)
    good = draw_faces(frame, [outcome(BLEND)])
    late = draw_faces(frame, [outcome(None, error=TIMEOUT)])
    failed = draw_faces(frame, [outcome(None, error="BUSY")])
    edge = (slice(50, 110), 60)  # the box's left edge
    colours = [tuple(img[edge].max(axis=0)) for img in (good, late, failed)]
    assert len(set(colours)) == 3
    assert (changed(frame, late)[edge] != changed(frame, good)[edge]).any()  # dashed, not solid


def test_labels_on_small_faces_at_the_edges_stay_inside_the_frame():
    frame = np.full((60, 100, 3), 128, np.uint8)
    for box in (Box(0, 0, 16, 16), Box(88, 40, 12, 12)):
        out = draw_faces(frame, [outcome(BLEND, box=box)], second_label_threshold=0.25)
        assert out.shape == frame.shape
        diff = changed(frame, out)
        assert diff.sum() > 100  # the tag was drawn, clamped into the frame, not clipped away
        assert diff[max(0, box.y - 5):box.y + 5, max(0, box.x - 60):box.x + 5].any()


# ---------------------------------------------------------------- sources


def test_video_source_delivers_every_frame_when_not_realtime(clip):
    with VideoSource(clip) as src:
        frames = list(src)
    assert src.fps == pytest.approx(15)
    assert [f.index for f in frames] == list(range(16))
    assert [f.time_s for f in frames] == pytest.approx([n / 15 for n in range(16)])
    assert all(f.bgr.shape == (480, 640, 3) for f in frames)


class Clock:
    """Time for the realtime pacing test: the consumer's work and the source's waits advance it."""

    def __init__(self):
        self.t = 100.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.t

    def wait(self, s: float) -> None:
        self.waits.append(s)
        self.t += s


def test_realtime_video_skips_frames_when_the_consumer_is_slow(clip):
    clock = Clock()
    with VideoSource(clip, realtime=True, clock=clock) as src:
        got = []
        for frame in src.frames(wait=clock.wait):
            got.append(frame.index)
            clock.t += 0.2  # three frame intervals of work per frame
    assert got[0] == 0 and len(got) < 8
    assert all(b - a >= 3 for a, b in zip(got, got[1:])), got
    assert src.skipped == 16 - len(got) - (15 - got[-1])


def test_realtime_video_paces_a_fast_consumer_at_the_file_rate(clip):
    clock = Clock()
    with VideoSource(clip, realtime=True, clock=clock) as src:
        got = [(f.index, clock()) for f in src.frames(wait=clock.wait)]
    assert [i for i, _ in got] == list(range(16))
    assert [t - 100.0 for _, t in got] == pytest.approx([n / 15 for n in range(16)])
    assert src.skipped == 0


def test_video_source_errors(tmp_path):
    with pytest.raises(FerSwarmError, match="not found"):
        VideoSource(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(FerSwarmError, match="cannot read video"):
        src = VideoSource(bad)
        try:
            list(src)
        finally:
            src.close()


def test_image_folder_in_name_order_skipping_unreadable(tmp_path, astronaut_bgr, caplog):
    cv2.imwrite(str(tmp_path / "b.png"), astronaut_bgr)
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr[:, ::-1])
    (tmp_path / "c.png").write_bytes(b"\x89PNG not really")
    cv2.imwrite(str(tmp_path / "d.png"), astronaut_bgr[:100])
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING), ImageFolderSource(tmp_path) as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 3]
    assert [f.bgr.shape for f in frames] == [(512, 512, 3), (512, 512, 3), (100, 512, 3)]
    assert src.unreadable == [tmp_path / "c.png"] and "c.png" in caplog.text


def test_image_folder_errors(tmp_path):
    with pytest.raises(FerSwarmError, match="not found"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FerSwarmError, match="no images"):
        ImageFolderSource(tmp_path)


class FakeCamera:
    """A camera outside the system: frames at about ``fps``, then (optionally) unplugged."""

    def __init__(self, n: int | None = 40, fps: float = 200.0, opened: bool = True):
        self.n, self.period, self.opened = n, 1 / fps, opened
        self.reads = 0
        self.released = False
        self.frame = np.full((48, 64, 3), 90, np.uint8)

    def isOpened(self) -> bool:
        return self.opened

    def get(self, prop) -> float:
        return 1 / self.period if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        time.sleep(self.period)
        if self.n is not None and self.reads >= self.n:
            return False, None
        self.reads += 1
        return True, self.frame

    def release(self) -> None:
        self.released = True


def test_camera_keeps_only_the_newest_frame_for_a_slow_consumer():
    cam = FakeCamera(n=40, fps=200)
    src = CameraSource(3, capture=cam)
    try:
        got = []
        started = time.monotonic()
        for frame in src:
            got.append(frame)
            time.sleep(0.02)  # slower than the camera: frames in between are replaced
            assert time.monotonic() - started < 5
    finally:
        src.close()
    indices = [f.index for f in got]
    assert indices == sorted(set(indices)) and len(got) < 40
    assert max(b - a for a, b in zip(indices, indices[1:])) > 1
    assert all(b.time_s > a.time_s for a, b in zip(got, got[1:]))
    assert cam.released and src.fps == pytest.approx(200)
    assert src._thread is not None and not src._thread.is_alive()


def test_camera_without_realtime_delivers_every_frame_read():
    cam = FakeCamera(n=12)
    with CameraSource(0, capture=cam, realtime=False) as src:
        assert [f.index for f in src] == list(range(12))
    assert cam.released


def test_camera_that_cannot_be_opened():
    cam = FakeCamera(opened=False)
    with pytest.raises(FerSwarmError, match="cannot open camera 5"):
        CameraSource(5, capture=cam)
    assert cam.released


def test_open_source_picks_the_given_one(clip, tmp_path):
    with pytest.raises(FerSwarmError, match="--camera"):
        open_source()
    with open_source(video=clip) as src:
        assert src.kind == "video" and not src.realtime
    with open_source(video=clip, realtime=True) as src:
        assert src.realtime


# ---------------------------------------------------------------- client


def test_client_connects_and_matches_replies_sent_back_in_reverse(ctx, make_router, caplog):
    router = make_router(gather=3)
    with caplog.at_level(logging.WARNING), SwarmClient(ctx, router.endpoint, connect_timeout_s=5) as client:
        welcome = client.connect()
        assert welcome.model == MODEL
        assert "malformed" in caplog.text  # the junk frame before WELCOME was dropped, not fatal
        jobs = [[cid(frame, k, stream="cam-1") for k in range(n)] for frame, n in ((5, 2), (6, 1), (7, 3))]
        crops = [[np.full((48, 40), 10 * frame + k, np.uint8) for k in range(len(ids))]
                 for frame, ids in zip((5, 6, 7), jobs)]
        crops[0][0] = np.arange(48 * 40, dtype=np.uint32).astype(np.uint8).reshape(48, 40)  # row-major, not column
        assert all(client.send_job(ids, cs, deadline_ms=250) for ids, cs in zip(jobs, crops))
        replies = []
        deadline = time.monotonic() + 5
        while len(replies) < 3 and time.monotonic() < deadline:
            replies += client.poll_replies(50)
    assert [r.command.value for r in replies] == ["RESULT"] * 3
    assert [set(r.ids) for r in replies] == [set(ids) for ids in jobs[::-1]]  # one reply per job, last job first
    assert all(r.worker == worker_for(ids) for r, ids in zip(replies, jobs[::-1]))
    assert all(f.label == label_for(f.id) for r in replies for f in r.faces)
    assert router.reversed_batches == 1
    assert [list(j.ids) for j in router.jobs] == jobs
    assert [list(j.payloads) for j in router.jobs] == [[c.tobytes() for c in cs] for cs in crops]
    assert {(j.width_px, j.height_px, j.deadline_ms) for j in router.jobs} == {(40, 48, 250)}


def test_client_says_when_no_worker_is_registered(ctx, make_router):
    router = make_router(model=None)
    with SwarmClient(ctx, router.endpoint, connect_timeout_s=1.2) as client:
        started = time.monotonic()
        with pytest.raises(FerSwarmError, match="no worker is registered"):
            client.connect()
    assert time.monotonic() - started > 1.1  # it waited its whole timeout
    assert router.hellos >= 2  # HELLO is repeated while waiting


def test_client_says_when_no_broker_answers(ctx):
    with SwarmClient(ctx, "tcp://127.0.0.1:9", connect_timeout_s=0.3) as client:
        with pytest.raises(FerSwarmError, match="no broker answered at tcp://127.0.0.1:9"):
            client.connect()


def test_send_never_blocks_and_reports_a_full_socket(ctx):
    with SwarmClient(ctx, "tcp://127.0.0.1:9", hwm=2) as client:
        crop = np.zeros((48, 40), np.uint8)
        results = [client.send_job([cid(k, 0), cid(k, 1)], [crop, crop], 100) for k in range(20)]
    assert not any(results)  # ZMQ_IMMEDIATE: nothing is queued for a broker that is not connected


def test_zmq_errors_become_transport_errors(ctx):
    with pytest.raises(TransportError, match="cannot connect to not-an-endpoint"):
        SwarmClient(ctx, "not-an-endpoint")


# ---------------------------------------------------------------- run_edge, end to end


def edge_settings(tmp_path: Path, endpoint: str, **kw) -> EdgeSettings:
    """Per-frame labelling (no tracks, no smoothing, every face sent): each event shows its own reply."""
    base = dict(broker=endpoint, output=tmp_path / "annotated.mp4", events=tmp_path / "events.jsonl",
                connect_timeout_s=5, display_delay_ms=1500, stream="test", tracking=False, smoothing=False,
                relabel_ms=0)
    return EdgeSettings(**(base | kw))


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_frame(events: list[dict]) -> dict[int, list[dict]]:
    """Events grouped by frame, in the order they were written (face order within a frame)."""
    out: dict[int, list[dict]] = {}
    for e in events:
        out.setdefault(e["frame"], []).append(e)
    return out


def test_run_edge_headless_labels_every_face_with_its_own_reply(ctx, make_router, clip, tmp_path):
    router = make_router(gather=2)  # two frames' jobs at a time, answered last first
    settings = edge_settings(tmp_path, router.endpoint, video=clip)
    summary = run_edge(settings, context=ctx)

    events = read_events(settings.events)
    assert summary.frames == 16 and summary.faces == len(events) >= 30  # two faces in (nearly) every frame
    assert summary.answered == summary.faces and summary.errors == {}
    assert summary.latency_p50_ms is not None and 0 < summary.latency_p50_ms <= summary.latency_p95_ms < 1500
    assert sum(summary.labels.values()) == summary.faces and summary.to_dict()["frames"] == 16
    assert [e["frame"] for e in events] == sorted(e["frame"] for e in events)  # shown in capture order
    frames = by_frame(events)
    for frame, faces in frames.items():
        ids = [cid(frame, e["track"], stream="test") for e in faces]
        for id, e in zip(ids, faces):
            assert (e["label"], e["worker"], e["error"]) == (label_for(id), worker_for(ids), None), e
            assert e["time_s"] == pytest.approx(frame / 15, abs=1e-3)
    # Each face's box is where the detector put it: face 0 is the larger one.
    assert all(f[0]["box"][2] >= f[1]["box"][2] for f in frames.values() if len(f) == 2)
    assert router.reversed_batches >= 1 and len(router.jobs) == len(frames)  # one JOB per frame with faces
    assert sum(len(j.ids) for j in router.jobs) == summary.faces
    assert {(j.width_px, j.height_px) for j in router.jobs} == {(40, 48)}  # the size WELCOME announced
    assert all(len(c) == 40 * 48 and np.frombuffer(c, np.uint8).std() > 20 for j in router.jobs for c in j.payloads)

    annotated, original = read_clip(settings.output), read_clip(clip)
    assert len(annotated) == 16 and annotated[0].shape == (480, 640, 3)
    x, y, w, h = events[0]["box"]
    assert np.abs(annotated[0].astype(int) - original[0])[y:y + h, x].mean() > 40  # the box is drawn


def test_run_edge_sends_a_frames_faces_in_one_job(ctx, make_router, clip, tmp_path):
    router = make_router()
    settings = edge_settings(tmp_path, router.endpoint, video=clip, max_frames=6, output=None)
    summary = run_edge(settings, context=ctx)
    frames = by_frame(read_events(settings.events))
    assert summary.frames == 6 and summary.answered == summary.faces
    assert any(len(faces) >= 2 for faces in frames.values())  # else this test would prove nothing
    assert [j.ids[0].frame for j in router.jobs] == sorted(frames)  # one JOB per frame with faces, in order
    gray = [to_gray(image) for image in read_clip(clip)]
    for job, wire_frames, (frame, faces) in zip(router.jobs, router.job_frames, sorted(frames.items())):
        assert wire_frames == 3 + len(faces)  # tag, command, header, then one payload frame per face
        assert list(job.ids) == [cid(frame, e["track"], stream="test") for e in faces]  # face order
        assert list(job.payloads) == [
            crop_face(gray[frame], Box(*e["box"]), (40, 48), DEFAULT_FRAMINGS["yunet"]).tobytes() for e in faces]


class GridDetector:
    """Finds ``n`` faces in a grid: more than one JOB holds (the clip's real faces are two)."""

    name = "grid"

    def __init__(self, n: int):
        self.n = n

    def detect(self, frame: np.ndarray) -> list[Face]:
        return [Face(Box(10 + 60 * (i % 10), 10 + 60 * (i // 10), 50, 50)) for i in range(self.n)]


def test_run_edge_splits_a_frame_with_more_faces_than_a_job_holds(ctx, make_router, clip, tmp_path):
    n = MAX_CROPS + 4
    router = make_router()
    settings = edge_settings(tmp_path, router.endpoint, video=clip, max_frames=2, max_faces=n, output=None)
    summary = run_edge(settings, context=ctx, detector=GridDetector(n))
    assert summary.frames == 2 and summary.faces == summary.answered == 2 * n
    # Tracking is off: every face of every frame is a new track, numbered from 1.
    parts = [[cid(f, f * n + k + 1, stream="test") for k in range(start, min(start + MAX_CROPS, n))]
             for f in range(2) for start in range(0, n, MAX_CROPS)]
    assert [list(j.ids) for j in router.jobs] == parts and [len(p) for p in parts] == [16, 4, 16, 4]
    workers = {id: worker_for(part) for part in parts for id in part}
    grid = [f.box.as_list() for f in GridDetector(n).detect(np.zeros((480, 640), np.uint8))]
    for frame, faces in by_frame(read_events(settings.events)).items():
        assert [e["box"] for e in faces] == grid
        for k, e in enumerate(faces):
            id = cid(frame, frame * n + k + 1, stream="test")
            assert (e["label"], e["worker"], e["error"]) == (label_for(id), workers[id], None), e


def test_run_edge_shows_late_frames_with_what_arrived(ctx, make_router, clip, tmp_path):
    router = make_router(hold_s=0.4)  # slower than the display delay
    settings = edge_settings(tmp_path, router.endpoint, video=clip, display_delay_ms=50, max_frames=4, output=None)
    summary = run_edge(settings, context=ctx)
    events = read_events(settings.events)
    assert summary.frames == 4 and summary.answered == 0 and summary.faces > 0
    assert summary.errors == {TIMEOUT: summary.faces} and summary.latency_p50_ms is None
    assert {e["error"] for e in events} == {TIMEOUT}
    assert all(e["label"] is None and e["probabilities"] is None for e in events)


FAILURES = {1: (Busy, "queue full"), 2: (Expired, "deadline passed in queue"), 3: (Error, "inference failed")}


def test_run_edge_counts_errors_by_kind(ctx, make_router, clip, tmp_path):
    def answer(job: Job):
        failure = FAILURES.get(job.ids[0].frame % 4)
        if failure is None:
            return result_for(job.ids)
        kind, reason = failure
        return kind(ids=job.ids, reason=reason)  # one terminal reply naming all the job's faces

    router = make_router(answer=answer)
    settings = edge_settings(tmp_path, router.endpoint, video=clip, max_frames=6, max_faces=2, output=None)
    summary = run_edge(settings, context=ctx)
    events = read_events(settings.events)
    expected: dict[str, int] = {}
    for frame, faces in by_frame(events).items():
        failure = FAILURES.get(frame % 4)
        for k, e in enumerate(faces):
            if failure is None:
                assert (e["error"], e["label"]) == (None, label_for(cid(frame, e["track"], stream="test"))), e
                continue
            kind, reason = failure
            assert (e["error"], e["label"], e["latency_ms"] is not None) == (
                f"{kind.command.value}: {reason}", None, True), e
            expected[kind.command.value] = expected.get(kind.command.value, 0) + 1
    assert summary.frames == 6 and summary.errors == expected
    assert set(expected) == {"BUSY", "EXPIRED", "ERROR"} and summary.answered == summary.faces - sum(expected.values())
    assert summary.answered >= 2


def test_run_edge_max_faces_limits_jobs(ctx, make_router, clip, tmp_path):
    router = make_router()
    settings = edge_settings(tmp_path, router.endpoint, video=clip, max_frames=3, max_faces=1, output=None)
    summary = run_edge(settings, context=ctx)
    assert summary.faces == len(router.jobs) == 3
    assert [[i.face for i in j.ids] for j in router.jobs] == [[1], [2], [3]]  # no tracking: a new track a frame
    assert router.job_frames == [4] * 3  # one payload frame each


def test_run_edge_stops_a_camera_when_asked(ctx, make_router, astronaut_bgr, tmp_path):
    router = make_router()
    cam = FakeCamera(n=None, fps=30)
    cam.frame = cv2.resize(astronaut_bgr, (320, 320))
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    settings = edge_settings(tmp_path, router.endpoint, output=None, max_frames=300)
    source = CameraSource(0, capture=cam)
    try:
        timer.start()
        started = time.monotonic()
        summary = run_edge(settings, context=ctx, stop=stop, source=source)
        assert time.monotonic() - started < 60  # it stopped (a guard; not a speed)
    finally:
        timer.cancel()
        source.close()
    assert 3 <= summary.frames < 300 and summary.faces == summary.frames
    assert summary.answered >= summary.frames - 3  # all but the frames in flight at the stop


def test_run_edge_without_a_display_asks_for_headless_outputs(monkeypatch, clip):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(FerSwarmError, match="--output"):
        run_edge(EdgeSettings(video=clip))
    with pytest.raises(FerSwarmError, match="--events"):
        run_edge(EdgeSettings(video=clip, events=Path("x.jsonl"), show=True))


def test_run_edge_fails_clearly_without_a_pool(ctx, make_router, clip, tmp_path):
    router = make_router(model=None)
    settings = edge_settings(tmp_path, router.endpoint, video=clip, connect_timeout_s=0.6)
    with pytest.raises(FerSwarmError, match="no worker is registered"):
        run_edge(settings, context=ctx)
