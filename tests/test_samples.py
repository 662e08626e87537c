"""The sample clip and crops: real faces, found by the real detector, made the same way every time."""

from __future__ import annotations


import numpy as np
import pytest

from fer_swarm.errors import FerSwarmError
from fer_swarm.faces import HaarDetector, YuNetDetector, to_gray
from fer_swarm.samples import ASTRONAUT_FACE, read_clip, sample_clip, sample_faces


@pytest.fixture(scope="module")
def default_clip(tmp_path_factory):
    return sample_clip(tmp_path_factory.mktemp("clip") / "sample.mp4")


@pytest.mark.parametrize("detector", [HaarDetector, YuNetDetector])
def test_default_clip_has_its_frames_size_and_two_faces_nearly_everywhere(default_clip, detector):
    path = default_clip
    assert path.is_file() and path.suffix == ".mp4"
    # How long making the clip takes is the demo's figure to watch, not a test's to assert (issue 13.7).
    frames = read_clip(path)
    assert len(frames) == 90
    assert all(f.shape == (480, 640, 3) for f in frames)
    detector = detector()
    counts = [len(detector.detect(f)) for f in frames]
    assert sum(c == 2 for c in counts) >= 0.95 * len(frames), counts
    assert max(counts) == 2  # no phantom faces in the background


def test_faces_move_and_face_zero_is_the_largest(default_clip):
    path = default_clip
    frames = read_clip(path)
    detector = HaarDetector()
    first, last = [f.box for f in detector.detect(frames[0])], [f.box for f in detector.detect(frames[45])]
    assert len(first) == 2 and len(last) == 2
    assert first[0].w > first[1].w  # the copy is drawn smaller
    assert (first[0].x, first[0].y) != (last[0].x, last[0].y)


def test_one_face_in_a_small_frame(tmp_path):
    path = sample_clip(tmp_path / "one.mp4", frames=10, size=(320, 240), faces=1, fps=10)
    frames = read_clip(path)
    assert len(frames) == 10 and frames[0].shape == (240, 320, 3)
    detector = HaarDetector()
    assert sum(len(detector.detect(f)) == 1 for f in frames) >= 9


def test_same_seed_same_frames_other_seed_other_frames(tmp_path):
    a = read_clip(sample_clip(tmp_path / "a.mp4", frames=3, seed=7))
    b = read_clip(sample_clip(tmp_path / "b.mp4", frames=3, seed=7))
    c = read_clip(sample_clip(tmp_path / "c.mp4", frames=3, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_too_many_faces_for_the_frame_is_refused(tmp_path):
    with pytest.raises(FerSwarmError, match="too small for 6 detectable faces"):
        sample_clip(tmp_path / "x.mp4", frames=2, faces=6)
    assert not (tmp_path / "x.mp4").exists()


def test_sample_faces_are_real_face_crops(astronaut_bgr):
    faces = sample_faces((40, 48))
    assert len(faces) >= 3
    for face in faces:
        assert face.shape == (48, 40) and face.dtype == np.uint8 and face.flags["C_CONTIGUOUS"]
        assert face.std() > 20  # a face, not a flat patch
    assert np.array_equal(faces[1], faces[0][:, ::-1])
    # The constant is where the real detector finds her.
    (found,) = [f.box for f in HaarDetector().detect(astronaut_bgr)]
    assert abs(found.x - ASTRONAUT_FACE.x) <= 4 and abs(found.w - ASTRONAUT_FACE.w) <= 4
