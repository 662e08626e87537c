"""Sample faces that work on any fresh install: a demo clip and face crops, no downloads.

Everything here is made from ``skimage.data.astronaut()``, the public-domain
NASA portrait of Eileen Collins that ships inside scikit-image's wheel, so the
demo, the tests and the benchmarks need neither a network nor the FER2013
folder (whose images must never leave this machine). The clip shows the
astronaut's head, and for more than one face mirrored and rescaled copies of
it, gliding over a plain background: real faces that OpenCV's Haar cascade
finds, moving so the edge's per-frame detection is actually exercised.

The background is a smooth two-tone gradient, not one flat colour: the
detector equalises the histogram first, and a flat colour covering most of
the frame takes most of the histogram, squeezing the faces into a few gray
levels where the cascade misses them in one frame out of five.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import cv2
import numpy as np

from .errors import FerSwarmError
from .faces import Box, crop_face, to_gray
from .framing import DEFAULT_FRAMINGS, Framing

__all__ = ["ASTRONAUT_FACE", "read_clip", "sample_clip", "sample_faces"]

# Where HaarDetector() finds the face in the 512x512 portrait.
ASTRONAUT_FACE = Box(174, 66, 98, 98)
# The pasted patch is the face box widened by half its size on each side: the
# cascade needs some hair, ears and chin around the face to fire reliably.
_PATCH = Box(ASTRONAUT_FACE.x - 49, ASTRONAUT_FACE.y - 49, 196, 196)
# Copy i of the face is drawn at this fraction of the largest size, so "largest
# first" ordering is stable and the detector sees several scales.
_SCALES = (1.0, 0.86, 0.93, 0.8, 0.9, 0.83)
# Smallest face drawn, as a multiple of what the default detector can see
# (36 px at 480 px detection width); measured: below about twice that, the
# cascade starts missing the face in some frames.
_MIN_FACE_FACTOR = 1.9


@functools.lru_cache(maxsize=1)
def _astronaut_bgr() -> np.ndarray:
    from skimage import data  # local: scikit-image is slow to import and only needed here

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def _head_patch() -> tuple[np.ndarray, np.ndarray]:
    """The head, and a feathered elliptical alpha mask so no hard rectangle edge is pasted."""
    p = _PATCH
    head = _astronaut_bgr()[p.y:p.y + p.h, p.x:p.x + p.w].astype(np.float32)
    mask = np.zeros((p.h, p.w), np.float32)
    cv2.ellipse(mask, (p.w // 2, p.h // 2), (int(p.w * 0.45), int(p.h * 0.48)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=p.w * 0.03)
    return head, mask


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth gradient from dark to light in a random direction, slightly tinted (float32 BGR)."""
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    gray = rng.uniform(25, 55) + rng.uniform(160, 190) * ramp
    tint = rng.uniform(0.8, 1.0, size=3).astype(np.float32)
    return gray[..., None] * tint


def _grid(n: int, width: int, height: int) -> tuple[int, int]:
    """Columns and rows of cells, one face per cell, cells as square as the frame allows."""
    cols = max(1, min(n, math.ceil(math.sqrt(n * width / height))))
    return cols, math.ceil(n / cols)


def sample_clip(
    path: str | Path,
    *,
    frames: int = 90,
    size: tuple[int, int] = (640, 480),
    faces: int = 2,
    fps: float = 15,
    seed: int = 0,
    strict: bool = True,
) -> Path:
    """Write an mp4 (mp4v) of ``faces`` real faces moving smoothly over a plain background.

    ``size`` is (width, height). Face 0 is the largest; odd faces are mirrored.
    Every face is large enough for the default HaarDetector on a frame of this
    size, or FerSwarmError says the frame is too small for that many faces.
    The same arguments give the same frames. ``strict=False`` allows faces too
    small for the default detector (benchmarks that compare detection sizes).
    """
    width, height = size
    if frames < 1 or faces < 1 or fps <= 0:
        raise FerSwarmError("sample_clip needs frames >= 1, faces >= 1 and fps > 0")
    cols, rows = _grid(faces, width, height)
    cell_w, cell_h = width // cols, height // rows
    # The patch takes most of its cell; the rest is room to move in.
    base_px = int(min(cell_w, cell_h) * 0.85)
    smallest_face = base_px * min(_SCALES[i % len(_SCALES)] for i in range(faces)) / 2
    needed = 36 * max(1.0, width / 480) * _MIN_FACE_FACTOR  # HaarDetector's defaults: 36 px at 480 px wide
    if smallest_face < needed and strict:
        raise FerSwarmError(
            f"a {width}x{height} frame is too small for {faces} detectable faces "
            f"(faces would be {smallest_face:.0f} px, need {needed:.0f})"
        )
    rng = np.random.default_rng(seed)
    background = _background(rng, width, height)
    head, mask = _head_patch()
    sprites = []
    for i in range(faces):
        side = int(base_px * _SCALES[i % len(_SCALES)])
        img = cv2.resize(head, (side, side), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(mask, (side, side), interpolation=cv2.INTER_AREA)[..., None]
        if i % 2:
            img, alpha = img[:, ::-1], alpha[:, ::-1]
        col, row = i % cols, i // cols
        centre = (col * cell_w + cell_w / 2, row * cell_h + cell_h / 2)
        reach = ((cell_w - side) / 2, (cell_h - side) / 2)
        # Each face follows its own slow Lissajous path: smooth, never leaving its cell.
        period = rng.uniform(2.0, 4.0, size=2) * fps
        phase = rng.uniform(0, 2 * math.pi, size=2)
        sprites.append((img, alpha, side, centre, reach, period, phase))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise FerSwarmError(f"cannot write an mp4 to {path}")
    try:
        canvas = np.empty((height, width, 3), np.float32)
        for t in range(frames):
            canvas[:] = background
            for img, alpha, side, centre, reach, period, phase in sprites:
                x = int(round(centre[0] + reach[0] * math.sin(2 * math.pi * t / period[0] + phase[0]) - side / 2))
                y = int(round(centre[1] + reach[1] * math.sin(2 * math.pi * t / period[1] + phase[1]) - side / 2))
                region = canvas[y:y + side, x:x + side]
                region[:] = alpha * img + (1 - alpha) * region
            writer.write(np.clip(canvas, 0, 255).astype(np.uint8))
    finally:
        writer.release()
    return path


def sample_faces(size: tuple[int, int] = (48, 48), *, framing: Framing = DEFAULT_FRAMINGS["haar"]) -> list[np.ndarray]:
    """A few real gray face crops (width, height ``size``) made as the edge makes them from a Haar box:
    the astronaut's face, its mirror image, and a darker and a brighter copy."""
    gray = to_gray(_astronaut_bgr())
    face = crop_face(gray, ASTRONAUT_FACE, size, framing)
    darker = np.clip(face.astype(np.int16) - 40, 0, 255).astype(np.uint8)
    brighter = np.clip(face.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    return [face, np.ascontiguousarray(face[:, ::-1]), darker, brighter]


def read_clip(path: str | Path, limit: int = 10_000) -> list[np.ndarray]:
    """Every frame of a video file (at most ``limit``), as BGR arrays."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < limit:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    return frames
