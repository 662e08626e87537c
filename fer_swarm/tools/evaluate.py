"""``fer-swarm eval``: score a shipped model on a folder-per-class set, with the workers' runtime.

Runs the TFLite file through :class:`fer_swarm.model.Classifier` on one thread
(LiteRT, no TensorFlow), so the figures are the ones a worker thread gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import datasets, metrics
from ..model import Classifier, runtime_name


@dataclass
class Evaluation:
    model: Path
    model_id: str
    runtime: str
    report: metrics.Report
    ms_per_face: np.ndarray
    unreadable: list[Path]

    def to_dict(self) -> dict:
        return {
            "model": str(self.model),
            "model_id": self.model_id,
            "runtime": self.runtime,
            **self.report.to_dict(),
            "ms_per_face_median": round(float(np.median(self.ms_per_face)), 4),
            "ms_per_face_p95": round(float(np.percentile(self.ms_per_face, 95)), 4),
            "unreadable": [str(p) for p in self.unreadable],
        }


def evaluate(data_dir: Path, model_path: Path) -> Evaluation:
    """Predict every readable image of ``data_dir`` one at a time and time each call."""
    clf = Classifier(model_path, threads=1)
    data = datasets.load_gray(datasets.scan(data_dir), clf.crop_size, classes=clf.labels)
    clf.predict(data.images[0])  # the first call pays for lazy kernel set-up; keep it out of the timings
    preds = np.empty(len(data.labels), np.int64)
    times = np.empty(len(data.labels))
    for i, img in enumerate(data.images):
        t0 = time.perf_counter()
        probs = clf.predict(img)
        times[i] = (time.perf_counter() - t0) * 1000
        preds[i] = int(np.argmax(probs))
    return Evaluation(
        model=model_path,
        model_id=clf.card.model_id,
        runtime=runtime_name(),
        report=metrics.classification_report(data.labels, preds, clf.labels),
        ms_per_face=times,
        unreadable=data.unreadable,
    )


def plot_confusion(report: metrics.Report, path: Path, title: str = "") -> None:
    """Write the row-normalised confusion matrix as a PNG heat map (OpenCV only, no plotting library)."""
    k = len(report.classes)
    cell, left, top = 80, 110, 60
    img = np.full((top + k * cell + 90, left + k * cell + 20, 3), 255, np.uint8)
    rows = report.confusion / np.maximum(report.confusion.sum(axis=1, keepdims=True), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in range(k):
        for j in range(k):
            shade = int(255 - 200 * rows[i, j])
            x0, y0 = left + j * cell, top + i * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (255, shade, shade), -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (200, 200, 200), 1)
            color = (255, 255, 255) if rows[i, j] > 0.55 else (0, 0, 0)
            cv2.putText(img, f"{report.confusion[i, j]}", (x0 + 8, y0 + 32), font, 0.5, color, 1, cv2.LINE_AA)
            cv2.putText(img, f"{rows[i, j]:.0%}", (x0 + 8, y0 + 58), font, 0.45, color, 1, cv2.LINE_AA)
        cv2.putText(img, report.classes[i][:10], (5, top + i * cell + 45), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, report.classes[i][:9], (left + i * cell + 4, top + k * cell + 22), font, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(img, "predicted ->   (rows: true class)", (left, top + k * cell + 55), font, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    heading = f"{title}  accuracy {report.accuracy:.1%}  macro-F1 {report.macro_f1:.3f}  n={report.n}"
    cv2.putText(img, heading, (5, 30), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")
