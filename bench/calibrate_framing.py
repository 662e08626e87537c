"""Calibrate a detector's crop framing against the framing the model was trained on.

The clip maker (``fer_swarm.bench.clips``) pastes FER2013 crops into frames
and records each pasted square exactly: that square *is* the training
framing. This script runs a detector over such clips, matches each detection
to its truth face, and fits the :class:`~fer_swarm.framing.Framing` (scale and
centre shift, relative to the box's longer side) that maps the detector's box
onto the truth square: the median of each ratio, which a few bad boxes cannot
drag. It then scores framings side by side on the same detections, with the
real model:

- agreement: how often the model's answer on the detector-made crop equals
  its answer on the truth square (the face exactly as in training);
- accuracy: how often it equals the truth label.

Use clips built from ``val/`` with a seed other than the benchmark's, so the
framing is not fitted to the faces it is then judged on:

    python -m fer_swarm.bench.clips bench-out/calib --source ../shared/datasets/fer2013/val --kinds still,moving --seed 1
    python bench/calibrate_framing.py bench-out/calib --detector yunet
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from fer_swarm.faces import Face, crop_face, make_detector, to_gray
from fer_swarm.framing import DEFAULT_FRAMINGS, Framing
from fer_swarm.model import DEFAULT_MODEL, Classifier


def truth_crop(gray: np.ndarray, square: list[float], size: tuple[int, int]) -> np.ndarray:
    """The truth square (centre, side, angle) cut upright from the frame: the crop as trained."""
    cx, cy, side, angle = square
    m = cv2.getRotationMatrix2D((cx, cy), -angle, size[0] / side)
    m[0, 2] += size[0] / 2 - cx
    m[1, 2] += size[1] / 2 - cy
    return cv2.warpAffine(gray, m, size, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def matches(clip_dir: Path, kind: str, detector, every: int) -> list[tuple[np.ndarray, Face, dict]]:
    """(gray frame, detection, truth face) for each detection inside a truth box of similar size."""
    cap = cv2.VideoCapture(str(clip_dir / f"{kind}.mp4"))
    truth = [json.loads(line) for line in (clip_dir / f"{kind}.truth.jsonl").read_text().splitlines()]
    out = []
    for record in truth:
        ok, frame = cap.read()
        if not ok:
            break
        if record["frame"] % every:
            continue
        gray = to_gray(frame)
        for face in detector.detect(frame):
            cx, cy = face.box.centre
            for t in record["faces"]:
                x, y, w, h = t["box"]
                if x <= cx <= x + w and y <= cy <= y + h and 0.3 <= face.box.side / t["square"][2] <= 2:
                    out.append((gray, face, t))
                    break
    cap.release()
    return out


def fit(found: list[tuple[np.ndarray, Face, dict]]) -> Framing:
    scale, dx, dy = [], [], []
    for _, face, t in found:
        cx, cy = face.box.centre
        s = face.box.side
        tx, ty, side, _ = t["square"]
        scale.append(side / s)
        dx.append((tx - cx) / s)
        dy.append((ty - cy) / s)
    return Framing(scale=round(statistics.median(scale), 3), shift_x=round(statistics.median(dx), 3),
                   shift_y=round(statistics.median(dy), 3))


def score(found, clf: Classifier, framing: Framing) -> dict:
    agree = correct = 0
    for gray, face, t in found:
        crop = crop_face(gray, face, clf.crop_size, framing)
        answer = clf.labels[int(np.argmax(clf.predict(crop)))]
        ideal = clf.labels[int(np.argmax(clf.predict(truth_crop(gray, t["square"], clf.crop_size))))]
        agree += answer == ideal
        correct += answer == t["label"]
    n = max(1, len(found))
    return {"n": len(found), "agreement": round(agree / n, 4), "accuracy": round(correct / n, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", type=Path, help="folder with KIND.mp4 and KIND.truth.jsonl")
    ap.add_argument("--detector", default="yunet", choices=("yunet", "haar"))
    ap.add_argument("--kinds", default="still,moving")
    ap.add_argument("--every", type=int, default=3, help="use every Nth frame")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = ap.parse_args()

    detector = make_detector(args.detector)
    clf = Classifier(args.model)
    found = {k: matches(args.clips, k, detector, args.every) for k in args.kinds.split(",")}
    fitted = fit([m for v in found.values() for m in v])
    print(f"{args.detector} at {detector.detect_width_px} px: fitted on {sum(len(v) for v in found.values())} detections: {fitted.model_dump()}")
    candidates = {
        "default now": DEFAULT_FRAMINGS[args.detector],
        "fitted": fitted,
        "fitted, scale -5%": fitted.model_copy(update={"scale": round(fitted.scale * 0.95, 3)}),
        "fitted, scale +5%": fitted.model_copy(update={"scale": round(fitted.scale * 1.05, 3)}),
    }
    if args.detector == "yunet":
        candidates["fitted + eye alignment"] = fitted.model_copy(update={"align_eyes": True})
    t0 = time.time()
    print(f"{'framing':28} " + "  ".join(f"{k:>24}" for k in found))
    for name, framing in candidates.items():
        cells = [score(v, clf, framing) for v in found.values()]
        print(f"{name:28} " + "  ".join(f"agree {c['agreement']:.3f} acc {c['accuracy']:.3f}" for c in cells)
              + f"   {framing.model_dump()}")
    ceiling = [sum(clf.labels[int(np.argmax(clf.predict(truth_crop(g, t["square"], clf.crop_size))))] == t["label"]
                   for g, _, t in v) / max(1, len(v)) for v in found.values()]
    print(f"{'the truth squares (ceiling)':28} " + "  ".join(f"{'':>12}acc {c:.3f}" for c in ceiling))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
