#!/usr/bin/env python3
"""Detector settings side by side: faces found, false boxes and milliseconds per frame (issue 10, point 1).

Runs each detector setting over clips with ground truth (``fer_swarm.bench.clips``)
and matches its boxes to the truth with the quality scorer's rule. Detection
alone, no tracking: what each setting gives the tracker to work with.

    python -m fer_swarm.bench.clips bench-out/calib --source ../shared/datasets/fer2013/val --kinds still,moving --seed 1
    python bench/detector_sweep.py bench-out/calib
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2

from fer_swarm.bench.quality import match_frame, read_jsonl
from fer_swarm.faces import make_detector

SETTINGS = [  # name, detector, detect width (0: full), score threshold, smallest face (frame px)
    ("haar 480", "haar", 480, 0.6, 48),
    ("yunet 320 s0.6", "yunet", 320, 0.6, 24),
    ("yunet 320 s0.4", "yunet", 320, 0.4, 24),
    ("yunet 480 s0.5", "yunet", 480, 0.5, 24),
    ("yunet 480 s0.4", "yunet", 480, 0.4, 24),
    ("yunet 480 s0.3", "yunet", 480, 0.3, 24),
    ("yunet 640 s0.5", "yunet", 0, 0.5, 24),
    ("yunet 640 s0.4", "yunet", 0, 0.4, 24),
    ("yunet 640 s0.3", "yunet", 0, 0.3, 24),
    ("yunet 640 s0.2", "yunet", 0, 0.2, 24),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", type=Path)
    ap.add_argument("--kinds", default="still,moving")
    ap.add_argument("--frames", type=int, default=600, help="frames per clip (from the start)")
    ap.add_argument("--every", type=int, default=2, help="use every Nth of those frames")
    ap.add_argument("--only", default="", help="comma-separated setting names to run (default: all)")
    args = ap.parse_args()
    frames = {}
    for kind in args.kinds.split(","):
        cap = cv2.VideoCapture(str(args.clips / f"{kind}.mp4"))
        imgs = []
        while len(imgs) < args.frames:
            ok, img = cap.read()
            if not ok:
                break
            imgs.append(img)
        truth = read_jsonl(args.clips / f"{kind}.truth.jsonl")[: len(imgs)]
        frames[kind] = (imgs[::args.every], truth[::args.every])
    rows = []
    wanted = set(filter(None, args.only.split(",")))
    for name, det, width, score, min_face in SETTINGS:
        if wanted and name not in wanted:
            continue
        detector = make_detector(det, detect_width_px=width, min_face_px=min_face, score_threshold=score)
        row = {"setting": name}
        for kind, (imgs, truth) in frames.items():
            found = total = false = 0
            seen: set[tuple] = set()
            hit: set[tuple] = set()
            t0 = time.perf_counter()
            results = [detector.detect(img) for img in imgs]
            ms = (time.perf_counter() - t0) * 1000 / len(imgs)
            for faces, line in zip(results, truth):
                events = [{"box": f.box.as_list()} for f in faces]
                matched = match_frame(line["faces"], events)
                found += len(matched)
                total += len(line["faces"])
                for i, face in enumerate(line["faces"]):
                    seen.add((face["id"], face["image"]))
                    if i in matched:
                        hit.add((face["id"], face["image"]))
                false += len(events) - len(matched)
            row[kind] = {"found": round(found / total, 4), "faces_found": round(len(hit) / max(1, len(seen)), 4),
                         "false_per_frame": round(false / len(imgs), 3),
                         "ms_per_frame": round(ms, 2)}
        rows.append(row)
        print(f"{name:16} " + "  ".join(
            f"{k}: found {v['found']:.3f} (faces {v['faces_found']:.3f}) false/frame {v['false_per_frame']:.2f} {v['ms_per_frame']:.1f} ms"
            for k, v in row.items() if k != "setting"), flush=True)
    (args.clips / "detector_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
