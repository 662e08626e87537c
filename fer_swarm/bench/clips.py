"""Test clips with ground truth, built from a folder-per-class of face crops (issue 10, point 6).

Every face is one source crop (FER2013: 48x48 gray) upscaled with cubic
interpolation to its drawn side, rotated, and pasted as a square whose border
is feathered over a few percent of its side, so it blends into the background
instead of showing a hard edge a detector could lock on to. The pasted square
*is* the crop the model was trained on, so the truth records it exactly
(``square``: centre, side, angle), besides the axis-aligned bounds of the
drawn square (``box``) that a detector's box is matched against.

Three kinds, each deterministic from its seed:

- ``still``: scenes of six still faces in a jittered 3x2 grid, six new faces
  every 2 s, over a mildly textured background with a little sensor noise;
- ``moving``: four faces on smooth paths that zoom and tilt (up to about
  +-15 degrees) over a blurred random texture with per-frame Gaussian noise;
  each face is replaced by a new person every few seconds; neighbours' paths
  overlap now and then, so faces cross;
- ``changing``: four gently moving faces, each swapping in place every 2/3 s
  to another crop with a *different* label while keeping its id: the same
  person changing expression.

Faces are drawn from the folder without replacement in a seeded random order,
so class proportions follow the folder's. Outputs per clip: ``NAME.mp4``
(mp4v, as the edge writes), ``NAME.truth.jsonl`` (one line per frame) and
``NAME.json`` (what was made, from what). The images and the clips made from
them must never be committed: write them under ``bench-out/``.

    python -m fer_swarm.bench.clips OUT_DIR --source DIR --kinds still,moving,changing --seed N
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..datasets import read_gray, scan
from ..errors import DatasetError, FerSwarmError

__all__ = ["KINDS", "MAKER_VERSION", "Clip", "clip_is_current", "make_clip", "make_clips"]

# Bumped whenever the same seed would draw different frames: cached clips are then remade.
MAKER_VERSION = 1
SIZE = (640, 480)
FPS = 30.0
# Default length of each kind, in seconds.
KINDS: dict[str, float] = {"still": 20.0, "moving": 30.0, "changing": 20.0}
FEATHER = 0.04  # the pasted square's border fades out over this fraction of its side


@dataclass(frozen=True)
class Clip:
    """The three files of one clip."""

    video: Path
    truth: Path
    meta: Path


class _Faces:
    """Source faces in a seeded random order, each used at most once per clip."""

    def __init__(self, source: Path, rng: np.random.Generator):
        folders = scan(source)
        self.root = folders.root
        items = [(c, p) for c in folders.classes for p in folders.files[c]]
        self._left = deque(items[i] for i in rng.permutation(len(items)))
        self._images: dict[str, np.ndarray] = {}

    def take(self, not_label: str | None = None) -> tuple[str, str]:
        """The next unused face ``(label, relative path)``, with a label other than ``not_label`` if given."""
        for _ in range(len(self._left)):
            label, path = self._left.popleft()
            if label == not_label:
                self._left.append((label, path))  # stays available, at the back
                continue
            rel = path.relative_to(self.root).as_posix()
            img = read_gray(path)
            if img is None:
                continue  # unreadable: datasets.read_gray's rule is to skip, not fail
            self._images[rel] = img
            return label, rel
        raise DatasetError(f"{self.root}: not enough distinct readable faces for this clip")

    def image(self, rel: str) -> np.ndarray:
        return self._images[rel]


@dataclass
class _Person:
    """One face on screen: who (id), which crop, and where at time t (a function of the frame index)."""

    id: int
    label: str
    image: str
    place: Callable[[int], tuple[float, float, float, float]]  # frame -> (cx, cy, side, angle_deg)


def _background(rng: np.random.Generator, texture: float) -> np.ndarray:
    """A gray-ish gradient plus a blurred random texture of amplitude ``texture`` (float32 BGR)."""
    w, h = SIZE
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    gray = rng.uniform(60, 90) + rng.uniform(60, 110) * ramp
    blobs = np.zeros((h, w), np.float32)
    for scale in (8, 24, 64):  # texture at a few scales: blotches, stains, grain
        small = rng.standard_normal((h // scale + 2, w // scale + 2)).astype(np.float32)
        big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        blobs += cv2.GaussianBlur(big, (0, 0), sigmaX=scale / 4)
    blobs *= texture / max(float(blobs.std()), 1e-6)
    tint = rng.uniform(0.85, 1.0, size=3).astype(np.float32)
    return (gray + blobs)[..., None] * tint


def _half_extent(side: float, angle_deg: float) -> float:
    """Half the width (= height) of the axis-aligned bounds of a square of ``side`` rotated by ``angle_deg``."""
    a = math.radians(angle_deg)
    return side / 2 * (abs(math.cos(a)) + abs(math.sin(a)))


def _paste(canvas: np.ndarray, face: np.ndarray, cx: float, cy: float, side: float, angle_deg: float) -> list[int]:
    """Draw ``face`` (gray) as a feathered square centred at (cx, cy), ``side`` px, rotated ``angle_deg``
    counter-clockwise; return the integer axis-aligned bounds [x, y, w, h] of the square, clipped to the frame.

    Frame pixel i covers [i, i+1), so the square spans cx +- side/2 exactly. One warp maps each frame
    pixel back into the source crop (cubic: the upscaling and the rotation in one resampling).
    """
    h_img, w_img = canvas.shape[:2]
    e = _half_extent(side, angle_deg)
    x0, y0 = max(0, math.floor(cx - e)), max(0, math.floor(cy - e))
    x1, y1 = min(w_img, math.ceil(cx + e)), min(h_img, math.ceil(cy + e))
    if x1 <= x0 or y1 <= y0:
        return [x0, y0, 0, 0]
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    # Frame point p (pixel centre of ROI index r: p = r + origin + 0.5) -> square coordinates
    # q = R(-a)(p - c) + side/2 (a positive angle turns the face counter-clockwise on screen, y down)
    # -> source pixel coordinates s = q * n/side - 0.5 (OpenCV puts pixel centres at integers).
    n_h, n_w = face.shape[:2]
    inv = np.array([[cos, -sin], [sin, cos]], np.float64)  # R(-a) with y pointing down
    offset = np.array([x0 + 0.5 - cx, y0 + 0.5 - cy])
    q0 = inv @ offset + side / 2
    to_src = np.diag([n_w / side, n_h / side])
    lin = to_src @ inv
    m = np.hstack([lin, (to_src @ q0 - 0.5)[:, None]]).astype(np.float32)
    roi_w, roi_h = x1 - x0, y1 - y0
    patch = cv2.warpAffine(face.astype(np.float32), m, (roi_w, roi_h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)
    # Alpha from each ROI pixel's position in the square: 1 inside, fading to 0 over the feather at its edges.
    yy, xx = np.mgrid[0:roi_h, 0:roi_w].astype(np.float32)
    qx = inv[0, 0] * xx + inv[0, 1] * yy + q0[0]
    qy = inv[1, 0] * xx + inv[1, 1] * yy + q0[1]
    feather = max(1.5, FEATHER * side)
    ax = np.clip(np.minimum(qx, side - qx) / feather, 0, 1)
    ay = np.clip(np.minimum(qy, side - qy) / feather, 0, 1)
    alpha = (ax * ay)[..., None]
    region = canvas[y0:y1, x0:x1]
    region[:] = alpha * np.clip(patch, 0, 255)[..., None] + (1 - alpha) * region
    return [x0, y0, x1 - x0, y1 - y0]


def _fit(cx: float, cy: float, side: float, angle: float) -> tuple[float, float, float, float]:
    """Move a square's centre so its rotated bounds stay inside the frame."""
    e = _half_extent(side, angle)
    w, h = SIZE
    return min(max(cx, e), w - e), min(max(cy, e), h - e), side, angle


def _still(rng: np.random.Generator, faces: _Faces, frames: int, new_id: Callable[[], int]):
    """Six still faces per 2 s scene, in a jittered 3x2 grid."""
    scene = round(2 * FPS)
    cell_w, cell_h = SIZE[0] / 3, SIZE[1] / 2
    people: list[tuple[int, int, _Person]] = []  # (first frame, last frame + 1, person)
    for start in range(0, frames, scene):
        for k in range(6):
            side = float(rng.uniform(100, 170))
            room_x, room_y = max(0.0, (cell_w - side) / 2), max(0.0, (cell_h - side) / 2)
            cx = (k % 3 + 0.5) * cell_w + rng.uniform(-0.8, 0.8) * room_x
            cy = (k // 3 + 0.5) * cell_h + rng.uniform(-0.8, 0.8) * room_y
            angle = float(rng.uniform(-4, 4))
            label, rel = faces.take()
            place = _fit(cx, cy, side, angle)
            people.append((start, min(frames, start + scene), _Person(new_id(), label, rel, lambda t, p=place: p)))
    return people


def _path(rng: np.random.Generator, home: tuple[float, float], reach: tuple[float, float], base: float,
          zoom: float, tilt: float, speed: float) -> Callable[[int], tuple[float, float, float, float]]:
    """A smooth path around ``home``: two sinusoids per coordinate, a slow zoom about ``base`` and a tilt."""
    periods = rng.uniform(3.0, 7.0, size=6) * FPS / speed
    phases = rng.uniform(0, 2 * math.pi, size=6)
    weights = rng.uniform(0.5, 1.0, size=2)

    def wave(i: int, t: int) -> float:
        return math.sin(2 * math.pi * t / periods[i] + phases[i])

    def place(t: int) -> tuple[float, float, float, float]:
        cx = home[0] + reach[0] * (weights[0] * wave(0, t) + (1 - weights[0]) * wave(1, t))
        cy = home[1] + reach[1] * (weights[1] * wave(2, t) + (1 - weights[1]) * wave(3, t))
        side = base * (1 + zoom * wave(4, t))
        return _fit(cx, cy, side, tilt * wave(5, t))

    return place


def _homes() -> list[tuple[float, float]]:
    w, h = SIZE
    return [(w * 0.27, h * 0.3), (w * 0.73, h * 0.3), (w * 0.27, h * 0.7), (w * 0.73, h * 0.7)]


def _moving(rng: np.random.Generator, faces: _Faces, frames: int, new_id: Callable[[], int]):
    """Four faces moving, zooming and tilting; each replaced by a new person every 3-6 s."""
    people = []
    for home in _homes():
        place = _path(rng, home, (130, 70), base=float(rng.uniform(115, 140)), zoom=0.25, tilt=15, speed=1.0)
        start = 0
        while start < frames:
            end = min(frames, start + round(rng.uniform(3, 6) * FPS))
            label, rel = faces.take()
            people.append((start, end, _Person(new_id(), label, rel, place)))
            start = end
    return people


def _changing(rng: np.random.Generator, faces: _Faces, frames: int, new_id: Callable[[], int]):
    """Four gently moving faces; each swaps to a crop with a different label every 2/3 s, keeping its id."""
    swap = round(FPS * 2 / 3)
    people = []
    for home in _homes():
        place = _path(rng, home, (70, 40), base=float(rng.uniform(120, 140)), zoom=0.12, tilt=8, speed=0.6)
        pid = new_id()
        start, label = 0, None
        first = int(rng.integers(swap // 2, swap + 1))  # faces do not all change on the same frame
        while start < frames:
            end = min(frames, first if start == 0 else start + swap)
            label, rel = faces.take(not_label=label)
            people.append((start, end, _Person(pid, label, rel, place)))
            start = end
    return people


_SCENES = {"still": _still, "moving": _moving, "changing": _changing}
# Background texture amplitude and per-frame sensor noise (gray levels, one sigma), per kind.
_LOOK = {"still": (6.0, 2.0), "moving": (18.0, 5.0), "changing": (14.0, 4.0)}


def clip_is_current(out_dir: Path, kind: str, source: Path, seed: int, seconds: float | None = None) -> bool:
    """Whether ``out_dir`` already holds this clip, made by this version of the maker from the same inputs."""
    meta = Path(out_dir) / f"{kind}.json"
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    wanted = {"maker_version": MAKER_VERSION, "seed": seed, "source": str(Path(source).resolve()),
              "seconds": seconds or KINDS[kind]}
    return all(m.get(k) == v for k, v in wanted.items()) and all(
        (Path(out_dir) / f"{kind}{suffix}").is_file() for suffix in (".mp4", ".truth.jsonl"))


def make_clip(out_dir: str | Path, kind: str, source: str | Path, *, seed: int = 0,
              seconds: float | None = None) -> Clip:
    """Write ``KIND.mp4``, ``KIND.truth.jsonl`` and ``KIND.json`` into ``out_dir``; the same arguments
    give the same clip. ``seconds`` defaults to the kind's length in :data:`KINDS`."""
    if kind not in _SCENES:
        raise FerSwarmError(f"unknown clip kind {kind!r}; kinds: {', '.join(_SCENES)}")
    seconds = seconds or KINDS[kind]
    frames = max(1, round(seconds * FPS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One generator per purpose, so that e.g. a noisier background does not reshuffle the faces.
    seeds = np.random.SeedSequence([seed, list(_SCENES).index(kind)]).spawn(3)
    face_rng, scene_rng, noise_rng = (np.random.default_rng(s) for s in seeds)
    faces = _Faces(Path(source), face_rng)
    ids = iter(range(1, 1_000_000))
    people = _SCENES[kind](scene_rng, faces, frames, lambda: next(ids))
    texture, noise = _LOOK[kind]
    background = _background(scene_rng, texture)

    clip = Clip(out_dir / f"{kind}.mp4", out_dir / f"{kind}.truth.jsonl", out_dir / f"{kind}.json")
    writer = cv2.VideoWriter(str(clip.video), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    if not writer.isOpened():
        raise FerSwarmError(f"cannot write an mp4 to {clip.video}")
    used: dict[tuple[int, str], str] = {}
    canvas = np.empty((SIZE[1], SIZE[0], 3), np.float32)
    try:
        with open(clip.truth, "w", encoding="utf-8") as truth:
            for t in range(frames):
                canvas[:] = background
                records = []
                for start, end, person in people:
                    if not start <= t < end:
                        continue
                    cx, cy, side, angle = person.place(t)
                    box = _paste(canvas, faces.image(person.image), cx, cy, side, angle)
                    used[(person.id, person.image)] = person.label
                    records.append({"id": person.id, "label": person.label, "box": box,
                                    "square": [round(cx, 2), round(cy, 2), round(side, 2), round(angle, 2)],
                                    "image": person.image})
                canvas += noise_rng.standard_normal(canvas.shape[:2], dtype=np.float32)[..., None] * noise
                writer.write(np.clip(canvas, 0, 255).astype(np.uint8))
                truth.write(json.dumps({"frame": t, "time_s": round(t / FPS, 4), "faces": records}) + "\n")
    finally:
        writer.release()
    meta = {
        "kind": kind, "fps": FPS, "size": list(SIZE), "seed": seed, "seconds": seconds,
        "source": str(Path(source).resolve()), "frames": frames, "maker_version": MAKER_VERSION,
        "ids": len({pid for pid, _ in used}), "distinct_faces": len(used),
        "class_counts": dict(sorted(Counter(used.values()).items())),
    }
    clip.meta.write_text(json.dumps(meta, indent=2) + "\n")
    return clip


def make_clips(out_dir: str | Path, source: str | Path, kinds: list[str], *, seed: int = 0,
               reuse: bool = True) -> dict[str, Clip]:
    """Each kind's clip in ``out_dir``, made unless a current one is there already (``reuse``)."""
    out_dir = Path(out_dir)
    clips = {}
    for kind in kinds:
        if reuse and clip_is_current(out_dir, kind, Path(source), seed):
            clips[kind] = Clip(out_dir / f"{kind}.mp4", out_dir / f"{kind}.truth.jsonl", out_dir / f"{kind}.json")
        else:
            clips[kind] = make_clip(out_dir, kind, source, seed=seed)
    return clips


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Make test clips with ground truth from a folder-per-class of faces.")
    ap.add_argument("out_dir", type=Path, help="where to write NAME.mp4, NAME.truth.jsonl and NAME.json")
    ap.add_argument("--source", type=Path, required=True, help="folder-per-class face crops (e.g. fer2013/val)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=None, help="length of every clip (default: each kind's own)")
    args = ap.parse_args(argv)
    for kind in args.kinds.split(","):
        clip = make_clip(args.out_dir, kind.strip(), args.source, seed=args.seed, seconds=args.seconds)
        meta = json.loads(clip.meta.read_text())
        print(f"{clip.video}: {meta['frames']} frames, {meta['distinct_faces']} faces {meta['class_counts']}")


if __name__ == "__main__":
    main()
