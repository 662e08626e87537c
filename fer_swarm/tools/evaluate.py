"""``fer-swarm eval``: score shipped models on a folder-per-class set, with the workers' runtime.

Runs each TFLite file through :class:`fer_swarm.model.Classifier` on one
thread (LiteRT, no TensorFlow), so the figures are the ones a worker thread
gets, beside what the model costs (MMAC per face, parameters, file size:
:mod:`fer_swarm.modelstats`).

Several models are scored on the same faces, and timed image by image in
turn (face 1 on every model, then face 2, ...), so a change of load on the
machine during the run falls on all of them alike: their ratio of
milliseconds holds from one CPU to another far better than the milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .. import datasets, metrics
from ..errors import ModelError
from ..model import Classifier, runtime_name
from ..modelstats import ModelStats, model_stats


@dataclass
class Evaluation:
    model: Path
    model_id: str
    runtime: str
    report: metrics.Report
    ms_per_face: np.ndarray
    unreadable: list[Path]
    stats: ModelStats
    quantization: str

    def to_dict(self) -> dict:
        return {
            "model": str(self.model),
            "model_id": self.model_id,
            "runtime": self.runtime,
            "quantization": self.quantization,
            **self.stats.to_dict(),
            **self.report.to_dict(),
            "ms_per_face_median": round(float(np.median(self.ms_per_face)), 4),
            "ms_per_face_p95": round(float(np.percentile(self.ms_per_face, 95)), 4),
            "unreadable": [str(p) for p in self.unreadable],
        }


def evaluate(data_dir: Path, model_paths: list[Path], *, threads: int = 1) -> list[Evaluation]:
    """Predict every readable image of ``data_dir`` with each model, one image at a time, timing each call.

    The models must take the same crop size and labels (so they see the same faces).
    """
    clfs = [Classifier(p, threads=threads) for p in model_paths]
    first = clfs[0]
    for clf in clfs[1:]:
        if clf.crop_size != first.crop_size or clf.labels != first.labels:
            raise ModelError(
                f"{clf.path} takes {clf.crop_size} crops labelled {', '.join(clf.labels)}; {first.path} takes "
                f"{first.crop_size} labelled {', '.join(first.labels)}: they cannot be scored on the same faces"
            )
    data = datasets.load_gray(datasets.scan(data_dir), first.crop_size, classes=first.labels)
    for clf in clfs:
        clf.predict(data.images[0])  # the first call pays for lazy kernel set-up; keep it out of the timings
    preds = np.empty((len(clfs), len(data.labels)), np.int64)
    times = np.empty((len(clfs), len(data.labels)))
    for i, img in enumerate(data.images):
        for m, clf in enumerate(clfs):
            t0 = time.perf_counter()
            probs = clf.predict(img)
            times[m, i] = (time.perf_counter() - t0) * 1000
            preds[m, i] = int(np.argmax(probs))
    return [
        Evaluation(
            model=clf.path,
            model_id=clf.card.model_id,
            runtime=runtime_name(),
            report=metrics.classification_report(data.labels, preds[m], clf.labels),
            ms_per_face=times[m],
            unreadable=data.unreadable,
            stats=model_stats(clf.path),
            quantization=clf.card.quantization,
        )
        for m, clf in enumerate(clfs)
    ]


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
