"""The edge's own pipeline speed: can it keep up with a 30 fps camera?

Two measurements on a 640x480 clip with four real faces:

- the whole edge (``run_edge``: capture, detect, crop, send, match, draw,
  write the annotated video) against a real broker with an echo worker, so
  inference costs nothing and the figure is the edge's alone, with YuNet at
  its default 320 px and at full resolution, and with the Haar cascade;
- each stage timed alone over the same frames, to show where the time goes.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from .. import protocol as p
from ..config import EdgeSettings
from ..faces import crop_face, make_detector, to_gray
from ..framing import DEFAULT_FRAMINGS
from ..launch import swarm
from ..samples import sample_clip


def stage_ms(clip: Path, detector_name: str, detect_width_px: int) -> dict:
    """Median milliseconds per frame of each stage, run alone (every face cropped in every frame)."""
    from ..edge.draw import draw_faces
    from ..edge.pipeline import FaceOutcome

    detector = make_detector(detector_name, detect_width_px=detect_width_px)
    framing = DEFAULT_FRAMINGS[detector_name]
    cap = cv2.VideoCapture(str(clip))
    times: dict[str, list[float]] = {"capture": [], "detect": [], "crop+encode": [], "draw": []}
    faces_found = []
    while True:
        t0 = time.perf_counter()
        ok, frame = cap.read()
        t1 = time.perf_counter()
        if not ok:
            break
        faces = detector.detect(frame)
        t2 = time.perf_counter()
        gray = to_gray(frame)
        boxes = [f.box for f in faces]
        ids = [p.CorrelationId(stream="fps", frame=0, face=i) for i in range(len(boxes))]
        crops = [crop_face(gray, face, (48, 48), framing).tobytes() for face in faces]
        if ids:
            p.encode(p.Job(ids=tuple(ids), deadline_ms=250, width_px=48, height_px=48, payloads=tuple(crops)))
        outcomes = [FaceOutcome(id=cid, box=box, label="happy", probabilities={"happy": 0.7, "sad": 0.3},
                                worker="w", latency_ms=5.0, error=None, reason="") for cid, box in zip(ids, boxes)]
        t3 = time.perf_counter()
        draw_faces(frame, outcomes, second_label_threshold=0.25)
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(dt * 1000)
        faces_found.append(len(boxes))
    out = {k: round(float(np.median(v)), 3) for k, v in times.items()}
    out["total"] = round(sum(out.values()), 3)
    out["faces_per_frame"] = round(float(np.mean(faces_found)), 2) if faces_found else 0.0
    return out


def measure(out_dir: Path, frames: int = 150) -> dict:
    """Stage timings and whole-edge fps (default settings: tracks, smoothing, relabel budget) per detector."""
    from ..edge.app import run_edge

    out_dir.mkdir(parents=True, exist_ok=True)
    clip = sample_clip(out_dir / "edge-4faces.mp4", frames=frames, faces=4, fps=30, strict=False)
    result: dict = {"clip": str(clip), "frames": frames, "size": [640, 480], "faces": 4}
    with swarm(1, worker_args=("--echo",)) as (front, _):
        for name, detector, width in (("yunet at 320 px (default)", "yunet", 320), ("yunet at 640 px", "yunet", 0),
                                      ("haar at 480 px", "haar", 480)):
            settings = EdgeSettings(broker=front, video=clip, output=out_dir / f"edge-{detector}-{width or 'full'}.mp4",
                                    detector=detector, detect_width_px=width, connect_timeout_s=60,
                                    stream=f"fps-{detector}-{width}")
            summary = run_edge(settings)
            result[name] = {
                "detector": detector,
                "detect_width_px": width,
                "edge_fps": round(summary.fps, 1),
                "faces": summary.faces,
                "labelled": summary.answered,
                "stages_ms": stage_ms(clip, detector, width),
            }
    return result
