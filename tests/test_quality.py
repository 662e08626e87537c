"""The edge-quality instrument: the scorer on hand-worked sequences, the clip maker on real faces."""

import json
import math

import cv2
import numpy as np
import pytest

from fer_swarm.bench.clips import clip_is_current, make_clip
from fer_swarm.bench.quality import ideal_labels, match_frame, read_jsonl, score
from fer_swarm.samples import read_clip

from .conftest import FER2013

A = {"id": 1, "label": "happy", "image": "happy/a.jpg", "box": [0, 0, 100, 100], "square": [50, 50, 100, 0]}
B = {"id": 2, "label": "sad", "image": "sad/b.jpg", "box": [200, 0, 100, 100], "square": [250, 50, 100, 0]}


def ev(frame, box, label=None, error=None, **extra):
    return {"frame": frame, "time_s": frame / 10, "box": box, "label": label, "probabilities": None,
            "error": error, **extra}


def test_match_needs_centre_inside_and_a_plausible_size():
    events = [
        ev(0, [10, 10, 80, 80]),  # centre (50, 50): A
        ev(0, [240, 40, 20, 20]),  # centre inside B, but 20 px < 0.3 x 100
        ev(0, [150, 0, 100, 100]),  # centre (200, 50): on B's left edge, counts
        ev(0, [0, 0, 250, 250]),  # centre (125, 125): inside neither
        ev(0, [-60, -60, 210, 210]),  # centre (45, 45) inside A, but 210 px > 2 x 100
    ]
    assert match_frame([A, B], events) == {0: 0, 1: 2}


def test_match_is_greedy_by_centre_distance():
    near, far = ev(0, [5, 5, 100, 100]), ev(0, [30, 30, 60, 60])  # centres (55, 55) and (60, 60)
    assert match_frame([A], [far, near]) == {0: 1}
    # Two truth faces that both contain one event's centre: the nearer truth face gets it.
    wide = {**B, "id": 3, "box": [0, 0, 300, 100], "square": [150, 50, 100, 0]}
    assert match_frame([wide, A], [near]) == {1: 0}


def hand_worked_clip():
    """10 frames at 10 fps. Face 1 is happy throughout; face 2 is sad, then angry from frame 5 (t = 0.5 s)."""
    truth = []
    for f in range(10):
        second = {**B, "label": "angry", "image": "angry/c.jpg"} if f >= 5 else B
        truth.append({"frame": f, "time_s": f / 10, "faces": [A, second]})
    shown_1 = ["happy", "happy", None, "-", "sad", "happy", "happy", "happy", "happy", "happy"]  # "-": not found
    shown_2 = ["sad"] * 7 + ["angry", "sad", "angry"]
    events = []
    for f in range(10):
        if shown_1[f] != "-":
            events.append(ev(f, [5, 5, 90, 90], shown_1[f], "TIMEOUT" if shown_1[f] is None else None))
        events.append(ev(f, [205, 5, 90, 90], shown_2[f]))
    events.append(ev(3, [500, 400, 50, 50], None, "UNSENT: the socket to the broker would block"))  # a false box
    return truth, events


def test_score_by_hand():
    truth, events = hand_worked_clip()
    # The model, given the ideal crops, gets a and c right and b wrong.
    ideal = {"happy/a.jpg": "happy", "sad/b.jpg": "fear", "angry/c.jpg": "angry"}
    r = score(truth, events, fps=10, edge_fps=29.5, ideal=ideal)
    # 20 face-frames; face 1 is missed in frame 3 only.
    assert r["face_frames"] == 20 and r["found"] == pytest.approx(19 / 20)
    assert r["faces_found"] == 1.0  # (1, a), (2, b), (2, c): each matched at least once
    # 18 matched with a label (frame 2 of face 1 timed out); right: face 1 in 7 frames (not frame 4),
    # face 2 in frames 0-4, 7 and 9.
    assert r["labelled"] == pytest.approx(18 / 19, abs=1e-4)
    assert r["accuracy"] == pytest.approx(14 / 18, abs=1e-4)
    assert r["shown_correct"] == pytest.approx(14 / 20)
    # Face 1: happy -> sad -> happy, both spurious (its truth never changes). Face 2: sad -> angry at
    # frame 7 follows the change of truth; angry -> sad -> angry after it are spurious. Over 2 face-seconds.
    assert r["changes_per_face_s"] == pytest.approx(5 / 2)
    assert r["spurious_per_face_s"] == pytest.approx(4 / 2)
    # Face 2 changed at 0.5 s and was first shown angry at 0.7 s.
    assert r["truth_changes"] == 1
    assert r["delay_ms"] == r["delay_ms_model_right"] == {"median": 200.0, "p90": 200.0, "followed": 1, "missed": 0}
    assert r["false_boxes_per_frame"] == pytest.approx(0.1)
    # 20 events; the UNSENT one was never sent, the TIMEOUT one was.
    assert r["faces_sent"] == 19 and r["faces_sent_per_s"] == 19.0
    # Right on the ideal crop in 15 of 20 face-frames (b is shown in 5).
    assert (r["edge_fps"], r["ceiling"]) == (29.5, 0.75)


def test_delay_counts_a_change_never_followed_before_the_next_one_as_missed():
    labels = ["sad"] * 3 + ["angry"] * 3 + ["happy"] * 4  # changes at frames 3 and 6
    shown = ["sad"] * 3 + ["sad"] * 3 + ["angry", "happy", "happy", "happy"]  # angry only after the next change
    truth = [{"frame": f, "time_s": f / 10, "faces": [{**B, "label": labels[f]}]} for f in range(10)]
    events = [ev(f, [205, 5, 90, 90], shown[f]) for f in range(10)]
    # The model gets the angry face wrong on its ideal crop: that change cannot count against the edge.
    ideal = {"sad/b.jpg": "sad", "angry/b.jpg": "fear", "happy/b.jpg": "happy"}
    for f in range(10):
        truth[f]["faces"][0]["image"] = f"{labels[f]}/b.jpg"
    r = score(truth, events, fps=10, ideal=ideal)
    assert r["delay_ms"] == {"median": 100.0, "p90": 100.0, "followed": 1, "missed": 1}
    assert r["delay_ms_model_right"] == {"median": 100.0, "p90": 100.0, "followed": 1, "missed": 0}
    # sad -> angry comes after a change of truth but is not the current truth: spurious;
    # angry -> happy is the current truth after a change: explained.
    assert r["changes_per_face_s"] == pytest.approx(2 / 1) and r["spurious_per_face_s"] == pytest.approx(1 / 1)


def test_events_with_tracks_and_a_relabel_budget():
    """The keys the new edge adds are ignored for matching; raw_label tells which faces were sent."""
    truth = [{"frame": f, "time_s": f / 10, "faces": [A]} for f in range(4)]
    raw = ["happy", None, None, "sad"]
    events = [ev(f, [5, 5, 90, 90], "happy", track=7, landmarks=[[30, 40]] * 5, raw_label=raw[f],
                 raw_probabilities=None) for f in range(4)]
    r = score(truth, events, fps=10)
    assert r["shown_correct"] == 1.0 and r["changes_per_face_s"] == 0.0
    assert r["faces_sent"] == 2 and r["faces_sent_per_s"] == 5.0
    # The edge's own flag, where it writes one, wins: sent in frame 1 but not yet answered.
    for e, sent in zip(events, [True, True, False, True]):
        e["sent"] = sent
    assert score(truth, events, fps=10)["faces_sent"] == 3


def test_no_events_at_all():
    truth, _ = hand_worked_clip()
    r = score(truth, [], fps=10)
    assert (r["found"], r["shown_correct"], r["accuracy"]) == (0.0, 0.0, None)
    assert r["delay_ms"]["missed"] == 1 and r["delay_ms"]["median"] is None
    assert r["delay_ms_model_right"] is None and r["ceiling"] is None  # no model labels given


@pytest.fixture(scope="module")
def val():
    if not (FER2013 / "val").is_dir():
        pytest.skip("FER2013 folder absent")
    return FER2013 / "val"


def square_crop(frame_gray, square, size=48):
    """Cut a rotated square (cx, cy, side, angle counter-clockwise) back out of a frame, as size x size."""
    cx, cy, side, angle = square
    a = math.radians(angle)
    fwd = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # square -> frame, y down
    lin = fwd * side / size
    offset = np.array([cx, cy]) - fwd @ np.array([side / 2, side / 2]) + lin @ np.array([0.5, 0.5]) - 0.5
    m = np.hstack([lin, offset[:, None]])
    return cv2.warpAffine(frame_gray, m, (size, size), flags=cv2.INTER_AREA | cv2.WARP_INVERSE_MAP)


@pytest.mark.parametrize("kind", ["still", "moving"])
def test_clip_truth_records_the_pasted_square(val, tmp_path, kind):
    clip = make_clip(tmp_path, kind, val, seed=3, seconds=0.5)
    frames = read_clip(clip.video)
    truth = read_jsonl(clip.truth)
    meta = json.loads(clip.meta.read_text())
    assert len(frames) == len(truth) == meta["frames"] == 15
    assert frames[0].shape == (480, 640, 3) and meta["size"] == [640, 480] and meta["fps"] == 30
    assert sum(meta["class_counts"].values()) == meta["distinct_faces"] == (6 if kind == "still" else 4)
    assert [len(t["faces"]) for t in truth] == [6 if kind == "still" else 4] * 15
    gray = cv2.cvtColor(frames[7], cv2.COLOR_BGR2GRAY).astype(np.float32)
    faces = truth[7]["faces"]
    sources = [cv2.imread(str(val / f["image"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) for f in faces]
    for i, face in enumerate(faces):
        x, y, w, h = face["box"]
        cx, cy, side, angle = face["square"]
        assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 480
        assert 85 <= side <= 185 and abs(angle) <= 16
        a = math.radians(angle)
        assert w == pytest.approx(side * (abs(math.cos(a)) + abs(math.sin(a))), abs=2)
        assert face["label"] == face["image"].split("/")[0]
        crop = square_crop(gray, face["square"])[3:-3, 3:-3]  # inside the feathered border
        errors = [float(np.abs(crop - s[3:-3, 3:-3]).mean()) for s in sources]
        assert errors[i] < 8, (face, errors)  # what is drawn is the source crop, where the truth says
        assert errors[i] == min(errors)


def test_changing_clip_swaps_expression_in_place(val, tmp_path):
    clip = make_clip(tmp_path, "changing", val, seed=1, seconds=1.5)
    truth = read_jsonl(clip.truth)
    by_id: dict[int, list[dict]] = {}
    for line in truth:
        for face in line["faces"]:
            by_id.setdefault(face["id"], []).append(face)
    assert len(by_id) == 4 and all(len(v) == 45 for v in by_id.values())
    for faces in by_id.values():
        swaps = [k for k in range(1, 45) if faces[k]["image"] != faces[k - 1]["image"]]
        assert 1 <= len(swaps) <= 3 and all(b - a == 20 for a, b in zip(swaps, swaps[1:]))  # every 2/3 s
        assert all(faces[k]["label"] != faces[k - 1]["label"] for k in swaps)
        assert all(math.dist(faces[k]["square"][:2], faces[k - 1]["square"][:2]) < 5 for k in swaps)  # in place
    assert clip_is_current(tmp_path, "changing", val, seed=1, seconds=1.5)
    assert not clip_is_current(tmp_path, "changing", val, seed=2, seconds=1.5)
    # The same seed gives the same clip.
    again = make_clip(tmp_path / "again", "changing", val, seed=1, seconds=1.5)
    assert again.truth.read_text() == clip.truth.read_text()
    # The real model on the ideal crops of these faces: one of its labels for each.
    ideal = ideal_labels(truth, val)
    assert set(ideal) == {f["image"] for line in truth for f in line["faces"]}
    assert set(ideal.values()) <= {"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}
    assert 0.0 <= score(truth, [], fps=30, ideal=ideal)["ceiling"] <= 1.0


def test_an_edge_that_shows_the_truth_scores_perfectly(val, tmp_path, capsys):
    from fer_swarm.bench.quality import main

    clip = make_clip(tmp_path, "changing", val, seed=5, seconds=1.0)
    events = tmp_path / "events.jsonl"
    with open(events, "w") as f:
        for line in read_jsonl(clip.truth):
            for face in line["faces"]:
                f.write(json.dumps(ev(line["frame"], face["box"], face["label"], track=face["id"])) + "\n")
    main([str(clip.truth), str(events), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert (r["found"], r["faces_found"], r["accuracy"], r["shown_correct"]) == (1.0, 1.0, 1.0, 1.0)
    assert r["spurious_per_face_s"] == 0.0 and r["false_boxes_per_frame"] == 0.0
    assert r["truth_changes"] >= 4 and r["delay_ms"]["median"] == 0.0 and r["delay_ms"]["missed"] == 0
    assert r["changes_per_face_s"] == pytest.approx(r["truth_changes"] / 4, abs=0.01)  # 4 faces x 1 s
