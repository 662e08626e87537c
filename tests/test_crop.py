"""``fer-swarm dataset crop`` on real photos: faces found by the edge's own detector."""

import cv2
import numpy as np
import pytest

from fer_swarm.datasets import read_gray
from fer_swarm.faces import HaarDetector, YuNetDetector, crop_face, to_gray
from fer_swarm.framing import Framing
from fer_swarm.model import load_card
from fer_swarm.tools.crop import crop_dataset

from fer_swarm.model import DEFAULT_MODEL

from .conftest import run_cli


@pytest.mark.parametrize("detector", [HaarDetector, YuNetDetector])
def test_detector_finds_the_astronaut(astronaut_bgr, detector):
    faces = detector().detect(astronaut_bgr)
    assert len(faces) == 1
    b = faces[0].box
    # Her face sits around x 170-270, y 50-200 in the 512x512 portrait.
    assert 130 < b.x + b.w / 2 < 300 and 50 < b.y + b.h / 2 < 200
    crop = crop_face(to_gray(astronaut_bgr), faces[0], (48, 48), Framing())
    assert crop.shape == (48, 48) and crop.dtype == np.uint8


def test_dataset_crop_counts_faces_and_skips_unreadable(tmp_path, astronaut_bgr):
    raw = tmp_path / "raw"
    (raw / "happy").mkdir(parents=True)
    (raw / "sad").mkdir(parents=True)
    cv2.imwrite(str(raw / "happy" / "one.jpg"), astronaut_bgr)
    cv2.imwrite(str(raw / "happy" / "two.jpg"), np.hstack([astronaut_bgr, astronaut_bgr]))
    cv2.imwrite(str(raw / "sad" / "wall.png"), np.full((300, 300, 3), 127, np.uint8))
    (raw / "sad" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    tallies = crop_dataset(raw, out, card=load_card(DEFAULT_MODEL))
    happy, sad = tallies["happy"], tallies["sad"]
    assert (happy.photos, happy.crops, happy.no_face, happy.several_faces, happy.unreadable) == (2, 3, 0, 1, [])
    assert (sad.photos, sad.crops, sad.no_face, sad.several_faces) == (2, 0, 1, 0)
    assert sad.unreadable == [raw / "sad" / "broken.jpg"]
    crops = sorted((out / "happy").iterdir())
    assert [p.name for p in crops] == ["one-0.png", "two-0.png", "two-1.png"]
    assert all(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape == (48, 48) for p in crops)
    assert list((out / "sad").iterdir()) == []


def test_dataset_crop_cli_reports_and_survives_unreadable(tmp_path, astronaut_bgr):
    raw = tmp_path / "raw"
    (raw / "happy").mkdir(parents=True)
    cv2.imwrite(str(raw / "happy" / "one.jpg"), astronaut_bgr)
    (raw / "happy" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    res = run_cli("dataset", "crop", str(raw), str(tmp_path / "out"), "--detector", "haar")
    assert res.returncode == 0, res.stderr
    assert "several faces" in res.stdout and "no face" in res.stdout
    assert "broken.jpg" in res.stderr
    assert cv2.imread(str(tmp_path / "out" / "happy" / "one-0.png"), cv2.IMREAD_UNCHANGED).shape == (48, 48)


def test_dataset_crop_on_folder_without_classes(tmp_path):
    res = run_cli("dataset", "crop", str(tmp_path), str(tmp_path / "out"))
    assert res.returncode == 1 and "no class subfolders" in res.stderr


def test_dataset_crop_frames_faces_as_the_model_card_says(tmp_path, astronaut_bgr):
    """The sidecar's framing, not a constant, decides the crop: a wider framing shows more around the face."""
    raw = tmp_path / "raw"
    (raw / "happy").mkdir(parents=True)
    cv2.imwrite(str(raw / "happy" / "one.png"), astronaut_bgr)
    card = load_card(DEFAULT_MODEL)
    wide = card.model_copy(update={"framing": {"yunet": Framing(scale=2.0)}})
    crop_dataset(raw, tmp_path / "tight", card=card)
    crop_dataset(raw, tmp_path / "wide", card=wide)
    tight_crop = cv2.imread(str(tmp_path / "tight" / "happy" / "one-0.png"), cv2.IMREAD_UNCHANGED)
    wide_crop = cv2.imread(str(tmp_path / "wide" / "happy" / "one-0.png"), cv2.IMREAD_UNCHANGED)
    gray = read_gray(raw / "happy" / "one.png")  # as dataset crop reads photos
    (face,) = YuNetDetector(detect_width_px=640).detect(gray)
    assert np.array_equal(tight_crop, crop_face(gray, face, (48, 48), card.framing["yunet"]))
    assert np.array_equal(wide_crop, crop_face(gray, face, (48, 48), Framing(scale=2.0)))
    assert not np.array_equal(tight_crop, wide_crop)
