"""Finding faces in a frame and turning each into the crop the model takes.

Shared by the edge client (live frames) and ``fer-swarm dataset crop``
(training photos), so that training crops are made exactly as live crops
are: a model taught on one kind of crop and shown another learns the wrong
thing (train/serve skew).

Detection runs on a downscaled, histogram-equalised gray copy of the frame
(480 px wide: a 640x480 frame then costs about 60% as much, and the smallest
face searched, 36 px there, is 48 px in the frame; at 320 px the cascade
missed most of four 80 px faces in the benchmark clip); boxes are mapped back
to full-frame coordinates and crops are cut from the full-resolution gray
frame, not the equalised one, because the model was trained on plain pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from .errors import FerSwarmError


@dataclass(frozen=True)
class Box:
    """A face box in frame pixels."""

    x: int
    y: int
    w: int
    h: int

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


class FaceDetector(Protocol):
    """Anything that finds faces: a better detector only needs this one method."""

    def detect(self, gray: np.ndarray) -> list[Box]: ...


def to_gray(frame: np.ndarray) -> np.ndarray:
    """8-bit gray from a BGR, BGRA or already gray frame."""
    if frame.ndim == 2:
        return frame
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (shipped in the opencv-python 4.x wheels under ``cv2.data``)."""

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

    def detect(self, gray: np.ndarray) -> list[Box]:
        """Face boxes in ``gray``'s coordinates, largest first."""
        h, w = gray.shape[:2]
        scale = min(1.0, self.detect_width_px / w) if self.detect_width_px > 0 else 1.0
        small = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else gray
        found = self._cascade.detectMultiScale(
            cv2.equalizeHist(small),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_face_px, self.min_face_px),
        )
        boxes = [Box(round(x / scale), round(y / scale), round(bw / scale), round(bh / scale)) for x, y, bw, bh in found]
        return sorted(boxes, key=lambda b: b.w * b.h, reverse=True)


def crop_face(gray: np.ndarray, box: Box, size: tuple[int, int], *, margin: float = 0.1) -> np.ndarray:
    """The model's input for one face: the box widened by ``margin`` of its size on each side
    (FER-style crops show the whole face, the Haar box is tight), clamped to the frame,
    resized to ``size`` (width, height) with area interpolation, as contiguous uint8."""
    h, w = gray.shape[:2]
    dx, dy = round(box.w * margin), round(box.h * margin)
    x0, y0 = max(0, box.x - dx), max(0, box.y - dy)
    x1, y1 = min(w, box.x + box.w + dx), min(h, box.y + box.h + dy)
    if x1 <= x0 or y1 <= y0:
        raise FerSwarmError(f"face box {box} lies outside the {w}x{h} frame")
    crop = cv2.resize(gray[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(crop, dtype=np.uint8)
