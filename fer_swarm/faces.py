"""Finding faces in a frame and turning each into the crop the model takes.

Shared by the edge client (live frames) and ``fer-swarm dataset crop``
(training photos), so that training crops are made exactly as live crops
are: a model taught on one kind of crop and shown another learns the wrong
thing (train/serve skew). How a detector's box becomes a crop is the model's
:class:`~fer_swarm.framing.Framing`, not a constant here.

Two detectors sit behind :class:`FaceDetector`:

- :class:`YuNetDetector` (the default): OpenCV's YuNet CNN
  (``cv2.FaceDetectorYN``), whose model file ships in ``models/``. It finds
  small, tilted and half-turned faces the Haar cascade misses, and gives five
  landmarks per face (eyes, nose tip, mouth corners) that the tracker and eye
  alignment use. It runs on a copy scaled to ``detect_width_px``.
- :class:`HaarDetector`: OpenCV's frontal-face Haar cascade, kept as an
  option (no model file, frontal faces only). It runs on a downscaled,
  histogram-equalised gray copy.

Either way, boxes are mapped back to full-frame coordinates and crops are cut
from the full-resolution gray frame, because the model was trained on plain
pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .errors import FerSwarmError
from .framing import Framing
from .shipped import shipped

__all__ = [
    "Box", "Face", "FaceDetector", "HaarDetector", "YuNetDetector", "YUNET_MODEL",
    "make_detector", "to_gray", "crop_square", "crop_face",
]

YUNET_MODEL = shipped("face_detection_yunet_2023mar.onnx")

Point = tuple[float, float]


@dataclass(frozen=True)
class Box:
    """A face box in frame pixels."""

    x: int
    y: int
    w: int
    h: int

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]

    @property
    def centre(self) -> Point:
        return (self.x + self.w / 2, self.y + self.h / 2)

    @property
    def side(self) -> int:
        return max(self.w, self.h)

    def iou(self, other: Box) -> float:
        """Intersection over union of the two boxes (0 when they do not touch)."""
        ix = max(0, min(self.x + self.w, other.x + other.w) - max(self.x, other.x))
        iy = max(0, min(self.y + self.h, other.y + other.h) - max(self.y, other.y))
        inter = ix * iy
        union = self.w * self.h + other.w * other.h - inter
        return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Face:
    """One detected face: its box, and the five YuNet landmarks when the detector gives them.

    ``landmarks`` are frame pixels in YuNet's order: the eye on the image's left,
    the eye on the image's right, the nose tip, the mouth corner on the image's
    left, the mouth corner on the image's right.
    """

    box: Box
    landmarks: tuple[Point, ...] | None = None
    score: float | None = None

    def eye_angle_deg(self) -> float:
        """The eye line's angle to the horizontal, in degrees (positive: the right-hand eye is lower)."""
        if not self.landmarks:
            return 0.0
        (lx, ly), (rx, ry) = self.landmarks[0], self.landmarks[1]
        return math.degrees(math.atan2(ry - ly, rx - lx))


class FaceDetector(Protocol):
    """Anything that finds faces. ``name`` picks the model's framing for its boxes."""

    name: str

    def detect(self, frame: np.ndarray) -> list[Face]:
        """Faces in ``frame`` (BGR or gray), in its pixel coordinates, largest first."""
        ...


def to_gray(frame: np.ndarray) -> np.ndarray:
    """8-bit gray from a BGR, BGRA or already gray frame."""
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def _to_bgr(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    return frame


def _scaled(image: np.ndarray, width_px: int) -> tuple[np.ndarray, float]:
    """``image`` shrunk to ``width_px`` wide (never enlarged) with area interpolation, and the scale used."""
    h, w = image.shape[:2]
    scale = min(1.0, width_px / w) if width_px > 0 else 1.0
    if scale >= 1.0:
        return image, 1.0
    return cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA), scale


class YuNetDetector:
    """OpenCV's YuNet face detector (``cv2.FaceDetectorYN``) on a copy scaled to ``detect_width_px``.

    ``min_face_px`` is in frame pixels: smaller boxes are dropped (at 320 px
    wide YuNet still finds faces of about 10 px in the scaled copy, 20 px in a
    640 px frame, but crops that small carry little expression).
    """

    name = "yunet"

    def __init__(
        self,
        model: str | Path = YUNET_MODEL,
        *,
        detect_width_px: int = 640,
        score_threshold: float = 0.4,
        nms_threshold: float = 0.3,
        min_face_px: int = 24,
    ):
        model = Path(model)
        if not model.is_file():
            raise FerSwarmError(f"YuNet model file not found: {model} (it ships in the project's models/ folder)")
        try:
            self._net = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score_threshold, nms_threshold, 5000)
        except cv2.error as e:
            raise FerSwarmError(f"cannot load the YuNet model {model}: not a valid ONNX face detector "
                                f"({str(e).strip().splitlines()[-1]})") from e
        self._size: tuple[int, int] = (320, 320)
        self.detect_width_px = detect_width_px
        self.min_face_px = min_face_px

    def detect(self, frame: np.ndarray) -> list[Face]:
        small, scale = _scaled(_to_bgr(frame), self.detect_width_px)
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, rows = self._net.detect(small)
        faces = []
        for row in rows if rows is not None else ():
            x, y, w, h = (float(v) / scale for v in row[:4])
            if max(w, h) < self.min_face_px:
                continue
            marks = tuple((float(row[4 + 2 * i]) / scale, float(row[5 + 2 * i]) / scale) for i in range(5))
            faces.append(Face(Box(round(x), round(y), round(w), round(h)), marks, float(row[14])))
        return sorted(faces, key=lambda f: f.box.w * f.box.h, reverse=True)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (shipped in the opencv-python 4.x wheels under ``cv2.data``).

    Detection runs on a downscaled, histogram-equalised gray copy (480 px wide:
    a 640x480 frame then costs about 60% as much; the smallest face searched,
    36 px there, is 48 px in the frame).
    """

    name = "haar"

    def __init__(
        self,
        *,
        detect_width_px: int = 480,
        scale_factor: float = 1.2,
        min_neighbors: int = 5,
        min_face_px: int = 36,
        cascade: str = "haarcascade_frontalface_default.xml",
    ):
        path = cv2.data.haarcascades + cascade
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise FerSwarmError(f"cannot load the Haar cascade {path} (is opencv-python 4.x installed?)")
        self.detect_width_px = detect_width_px
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face_px = min_face_px

    def detect(self, frame: np.ndarray) -> list[Face]:
        small, scale = _scaled(to_gray(frame), self.detect_width_px)
        found = self._cascade.detectMultiScale(
            cv2.equalizeHist(small),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_face_px, self.min_face_px),
        )
        boxes = [Box(round(x / scale), round(y / scale), round(bw / scale), round(bh / scale)) for x, y, bw, bh in found]
        return [Face(b) for b in sorted(boxes, key=lambda b: b.w * b.h, reverse=True)]


# Each detector's own defaults: (detect width in px, smallest face in frame px), chosen by
# bench/detector_sweep.py (docs/performance.md, "Detector settings").
DETECTOR_DEFAULTS = {"yunet": (640, 24), "haar": (480, 48)}


def make_detector(name: str, *, detect_width_px: int | None = None, min_face_px: int | None = None,
                  score_threshold: float = 0.4, nms_threshold: float = 0.3,
                  model: str | Path = YUNET_MODEL) -> FaceDetector:
    """The detector called ``name`` ("yunet" or "haar"); unset sizes take that detector's defaults.

    ``min_face_px`` is in frame pixels for both (Haar searches the scaled copy,
    so its minimum is scaled to match).
    """
    if name not in DETECTOR_DEFAULTS:
        raise FerSwarmError(f"unknown detector {name!r}: choose yunet or haar")
    default_width, default_min_face = DETECTOR_DEFAULTS[name]
    width = default_width if detect_width_px is None else detect_width_px
    min_face = default_min_face if min_face_px is None else min_face_px
    if name == "yunet":
        return YuNetDetector(model, detect_width_px=width, score_threshold=score_threshold,
                             nms_threshold=nms_threshold, min_face_px=min_face)
    # The cascade's minimum is in pixels of the scaled copy; 640 px frames are the common case.
    scale = min(1.0, width / 640) if width > 0 else 1.0
    return HaarDetector(detect_width_px=width, min_face_px=max(20, round(min_face * scale)))


def crop_square(face: Face, framing: Framing) -> tuple[float, float, float, float]:
    """The crop the model wants for ``face``: centre x, centre y, side (frame pixels) and rotation in degrees."""
    b = face.box
    cx, cy = b.centre
    s = b.side
    angle = face.eye_angle_deg() if framing.align_eyes and face.landmarks else 0.0
    return cx + framing.shift_x * s, cy + framing.shift_y * s, framing.scale * s, angle


def _cut(gray: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``gray[y0:y1, x0:x1]``, with the part outside the frame filled by repeating its edge pixels
    (clamping instead would squash a face at the frame's edge into a distorted crop)."""
    h, w = gray.shape[:2]
    if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0 or x1 <= x0 or y1 <= y0:
        raise FerSwarmError(f"face crop ({x0},{y0})-({x1},{y1}) lies outside the {w}x{h} frame")
    inside = gray[max(0, y0):min(h, y1), max(0, x0):min(w, x1)]
    pad = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    return cv2.copyMakeBorder(inside, *pad, cv2.BORDER_REPLICATE) if any(pad) else inside


def crop_face(gray: np.ndarray, face: Face | Box, size: tuple[int, int], framing: Framing) -> np.ndarray:
    """The model's input for one face: the square :func:`crop_square` gives, cut from the gray
    frame, resized to ``size`` (width, height) with area interpolation, as contiguous uint8.

    With eye alignment the square is first shrunk (area interpolation, so nothing
    aliases), then rotated upright.
    """
    if isinstance(face, Box):
        face = Face(face)
    cx, cy, side, angle = crop_square(face, framing)
    if abs(angle) < 1.0:  # a degree of tilt is below what 48 pixels can show
        half = side / 2
        region = _cut(gray, round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        crop = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
    else:
        # Cut 1.5 sides around the centre (a square rotated by up to 45 degrees fits),
        # shrink it to the crop's scale, then rotate about its centre and take the middle.
        reach = 0.75 * side
        region = _cut(gray, round(cx - reach), round(cy - reach), round(cx + reach), round(cy + reach))
        kx, ky = size[0] / side, size[1] / side
        small = cv2.resize(region, (max(1, round(region.shape[1] * kx)), max(1, round(region.shape[0] * ky))),
                           interpolation=cv2.INTER_AREA)
        centre = ((small.shape[1] - 1) / 2, (small.shape[0] - 1) / 2)
        m = cv2.getRotationMatrix2D(centre, angle, 1.0)
        m[0, 2] += (size[0] - 1) / 2 - centre[0]
        m[1, 2] += (size[1] - 1) / 2 - centre[1]
        crop = cv2.warpAffine(small, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(crop, dtype=np.uint8)
