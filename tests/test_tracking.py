"""Tracks, label smoothing and the relabel budget: the edge's rules over time.

The tracker runs on faces the real YuNet detector finds in real frames (the
astronaut portrait that scikit-image ships, moved and crossed by this test);
the label filter on answer vectors whose sequence is the point of each test.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fer_swarm.edge.labels import LabelFilter, TrackLabels
from fer_swarm.edge.relabel import RelabelBudget
from fer_swarm.edge.tracks import Tracker
from fer_swarm.faces import Box, Face, YuNetDetector
from fer_swarm.samples import read_clip, sample_clip

LABELS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
FPS = 30.0


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


@pytest.fixture(scope="module")
def two_face_frames(tmp_path_factory):
    clip = sample_clip(tmp_path_factory.mktemp("tracks") / "two.mp4", frames=30, faces=2, fps=15, seed=5)
    return read_clip(clip)


def head(astronaut_bgr: np.ndarray, side: int) -> np.ndarray:
    """The astronaut's head and some hair around it, ``side`` pixels square."""
    return cv2.resize(astronaut_bgr[20:220, 120:320], (side, side), interpolation=cv2.INTER_AREA)


def crossing_frames(astronaut_bgr: np.ndarray, n: int = 40) -> list[np.ndarray]:
    """Two faces of different sizes sliding past each other: the big one left to right,
    the small one (mirrored, drawn in front) right to left, a little lower."""
    big, small = head(astronaut_bgr, 150), head(astronaut_bgr, 110)[:, ::-1]
    frames = []
    for i in range(n):
        frame = np.full((480, 640, 3), 90, np.uint8)
        xb = int(40 + (640 - 190) * i / (n - 1))
        xs = int(640 - 150 - (640 - 190) * i / (n - 1))
        frame[100:250, xb:xb + 150] = big
        frame[230:340, xs:xs + 110] = small
        frames.append(frame)
    return frames


# ---------------------------------------------------------------- tracks


def test_a_track_keeps_its_id_through_a_missed_detection(detector, two_face_frames):
    tracker = Tracker(keep_ms=500, hold_ms=150)
    ids_per_frame = []
    for i, frame in enumerate(two_face_frames):
        faces = detector.detect(frame)
        assert len(faces) == 2
        if i in (10, 11):
            faces = faces[1:]  # the detector misses the larger face for two frames
        shown = tracker.update(faces, i / 15)
        ids_per_frame.append(sorted(tr.id for tr in shown))
        if i in (10, 11):
            missed = [tr for tr in shown if tr.missed]
            assert len(missed) == 1 and missed[0].box.w > 0  # still drawn, at its predicted box
    assert all(ids == [1, 2] for ids in ids_per_frame), ids_per_frame
    assert tracker.started == 2


def test_a_track_lost_for_longer_than_keep_ms_is_not_revived_and_ids_are_not_reused(detector, two_face_frames):
    tracker = Tracker(keep_ms=100, hold_ms=50)
    first = {tr.id for tr in tracker.update(detector.detect(two_face_frames[0]), 0.0)}
    assert tracker.update([], 0.2) == []  # both gone for longer than hold and keep
    again = {tr.id for tr in tracker.update(detector.detect(two_face_frames[4]), 0.4)}
    assert first == {1, 2} and again == {3, 4}


def test_two_crossing_faces_keep_their_tracks(detector, astronaut_bgr):
    tracker = Tracker()
    size_of: dict[int, list[int]] = {}
    for i, frame in enumerate(crossing_frames(astronaut_bgr)):
        for tr in tracker.update(detector.detect(frame), i / FPS):
            if not tr.missed:
                size_of.setdefault(tr.id, []).append(tr.box.w)
    # One track per face: the big face's boxes are all big, the small face's all small.
    assert len(size_of) == 2, {k: len(v) for k, v in size_of.items()}
    big, small = sorted(size_of.values(), key=np.median, reverse=True)
    assert min(big) > max(small), (big, small)
    assert len(big) >= 30 and len(small) >= 30


def test_without_tracking_every_face_is_a_new_track(detector, two_face_frames):
    tracker = Tracker(enabled=False)
    ids = [tr.id for i in range(3) for tr in tracker.update(detector.detect(two_face_frames[i]), i / 15)]
    assert ids == [1, 2, 3, 4, 5, 6]


def test_an_unsure_detection_is_shown_from_its_second_frame_and_a_one_frame_one_never():
    tracker = Tracker()
    face, wall = Face(Box(100, 100, 80, 80), score=0.5), Face(Box(400, 300, 60, 60), score=0.45)
    assert tracker.update([face, wall], 0.0) == []  # neither is sure enough alone
    (tr,) = tracker.update([Face(Box(102, 100, 80, 80), score=0.5)], 1 / FPS)  # the face again; the wall gone
    assert tr.id == 1 and tr.confirmed
    assert [t.id for t in tracker.update([], 2 / FPS)] == [1]  # held; the wall's track is never shown
    sure = Tracker()
    assert [t.id for t in sure.update([Face(Box(100, 100, 80, 80), score=0.9)], 0.0)] == [1]


def test_hold_cannot_exceed_keep():
    with pytest.raises(ValueError):
        Tracker(keep_ms=100, hold_ms=200)


# ---------------------------------------------------------------- labels


def answer(label: str, p: float = 0.7) -> np.ndarray:
    """A model answer: ``p`` on ``label``, the rest spread evenly."""
    out = np.full(len(LABELS), (1 - p) / (len(LABELS) - 1))
    out[LABELS.index(label)] = p
    return out


def shown_over(labels: TrackLabels, answers: list[str], step_s: float = 1 / FPS) -> list[str]:
    shown = []
    for i, label in enumerate(answers):
        labels.answer(1, dict(zip(LABELS, answer(label))), i * step_s)
        shown.append(labels.shown(1).label)
    return shown


def test_a_label_holds_against_one_noisy_answer():
    labels = TrackLabels(LABELS)
    seq = ["happy"] * 10 + ["sad"] + ["happy"] * 5
    assert shown_over(labels, seq) == ["happy"] * len(seq)


def test_a_label_follows_a_sustained_change_within_a_few_answers():
    labels = TrackLabels(LABELS)
    shown = shown_over(labels, ["happy"] * 15 + ["sad"] * 10)
    assert shown[:15] == ["happy"] * 15 and shown[-1] == "sad"
    lag = shown.index("sad") - 15
    assert lag <= 3  # three answers: 100 ms at 30 answers a second


def shown_between_sad_and_neutral(labels: TrackLabels) -> list[str]:
    """The labels shown for 30 answers alternating between sad and neutral, 0.45 against 0.40."""
    shown = []
    for i in range(30):
        first, second = ("sad", "neutral") if i % 2 else ("neutral", "sad")
        labels.answer(1, dict.fromkeys(LABELS, 0.03) | {first: 0.45, second: 0.40}, i * 0.1)
        shown.append(labels.shown(1).label)
    return shown


def test_a_face_between_two_expressions_keeps_one_label():
    """Answers alternating between two near-equal labels: the shown label does not flip with them."""
    shown = shown_between_sad_and_neutral(TrackLabels(LABELS))
    assert len(set(shown)) == 1, shown
    flips = shown_between_sad_and_neutral(TrackLabels(LABELS, switch_margin=0.0))
    assert len(set(flips)) == 2  # without the margin it would flip: the test can fail


def test_without_smoothing_the_latest_answer_is_shown():
    labels = TrackLabels(LABELS, smoothing=False)
    seq = ["happy"] * 5 + ["sad"] + ["happy"]
    assert shown_over(labels, seq) == seq


def test_old_answers_fade_by_time_not_by_count():
    """After a long silence one answer decides; right after a settled run it does not."""
    f = LabelFilter(len(LABELS), memory_ms=300, answer_weight=0.6)
    for i in range(10):
        f.update(answer("happy"), i / FPS)
    f.update(answer("sad"), 10 / FPS)
    assert LABELS[int(np.argmax(f.belief))] == "happy"
    f.update(answer("sad"), 5.0)  # seconds later: the earlier answers are forgotten
    assert LABELS[int(np.argmax(f.belief))] == "sad"


def test_an_answer_older_than_the_last_one_is_ignored():
    labels = TrackLabels(LABELS, smoothing=False)
    labels.answer(1, dict(zip(LABELS, answer("happy"))), 1.0)
    labels.answer(1, dict(zip(LABELS, answer("sad"))), 0.5)  # a late reply for an older frame
    assert labels.shown(1).label == "happy"


def test_shown_probabilities_are_the_smoothed_ones_and_sum_to_one():
    labels = TrackLabels(LABELS)
    shown_over(labels, ["happy"] * 3)
    s = labels.shown(1)
    assert s.label == "happy" and sum(s.probabilities.values()) == pytest.approx(1, abs=1e-3)
    assert s.probabilities["happy"] == max(s.probabilities.values())
    assert labels.shown(2) is None  # no answer yet
    labels.keep_only({2})
    assert labels.shown(1) is None


# ---------------------------------------------------------------- relabel budget


def test_the_relabel_budget_bounds_jobs_per_face(detector, two_face_frames):
    """15 fps for 2 s, relabel every 200 ms: each face is sent about 10 times, not 30."""
    tracker, budget = Tracker(), RelabelBudget(200)
    sent = {}
    for i, frame in enumerate(two_face_frames):
        t = i / 15
        for tr in tracker.update(detector.detect(frame), t):
            if budget.due(tr, t):
                budget.sent(tr, t)
                sent[tr.id] = sent.get(tr.id, 0) + 1
    assert sorted(sent) == [1, 2]
    # At most one send per 200 ms of video (10 in 2 s), plus a few for big moves.
    assert all(5 <= n <= 12 for n in sent.values()), sent


def test_the_relabel_budget_sends_a_new_moved_or_resized_face_at_once():
    budget = RelabelBudget(1000)
    tracker = Tracker()
    (tr,) = tracker.update([Face(Box(100, 100, 80, 80), score=0.9)], 0.0)
    assert budget.due(tr, 0.0)  # new
    budget.sent(tr, 0.0)
    (tr,) = tracker.update([Face(Box(104, 100, 80, 80), score=0.9)], 0.033)
    assert not budget.due(tr, 0.033)  # barely moved, within the interval
    (tr,) = tracker.update([Face(Box(104, 100, 110, 110), score=0.9)], 0.066)
    assert budget.due(tr, 0.066)  # came closer: a new crop is worth its job
    budget.sent(tr, 0.066)
    (tr,) = tracker.update([Face(Box(104, 100, 110, 110), score=0.9)], 1.07)
    assert budget.due(tr, 1.07)  # the interval passed
    assert RelabelBudget(0).due(tr, 1.07)  # 0: every frame


# ---------------------------------------------------------------- the detector's model file


def test_a_missing_or_corrupt_detector_model_is_a_clear_error(tmp_path):
    from fer_swarm.errors import FerSwarmError

    with pytest.raises(FerSwarmError, match="YuNet model file not found"):
        YuNetDetector(tmp_path / "nowhere.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not an onnx graph" * 10)
    with pytest.raises(FerSwarmError, match="cannot load the YuNet model .*junk.onnx"):
        YuNetDetector(junk)


def test_the_edge_command_names_a_missing_detector_model(tmp_path):
    from .conftest import run_cli

    res = run_cli("edge", "--images", str(tmp_path), "--events", str(tmp_path / "e.jsonl"),
                  "--yunet-model", str(tmp_path / "gone.onnx"), timeout=60)
    assert res.returncode != 0 and "gone.onnx" in res.stderr and "Traceback" not in res.stderr
