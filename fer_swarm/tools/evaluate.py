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
from typing import Callable

import numpy as np

from .. import charts, datasets, metrics
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


def evaluate(data_dir: Path, model_paths: list[Path], *, threads: int = 1,
             progress: Callable[[int, int], None] | None = None) -> list[Evaluation]:
    """Predict every readable image of ``data_dir`` with each model, one image at a time, timing each call.

    The models must take the same crop size and labels (so they see the same faces).
    ``progress(done, total)`` is called after each image has been scored by every model.
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
    total = len(data.images)
    for i, img in enumerate(data.images):
        for m, clf in enumerate(clfs):
            t0 = time.perf_counter()
            probs = clf.predict(img)
            times[m, i] = (time.perf_counter() - t0) * 1000
            preds[m, i] = int(np.argmax(probs))
        if progress is not None:
            progress(i + 1, total)
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


def plot_confusion(report: metrics.Report, path: Path, title: str = "") -> Path:
    """Write the confusion matrix as a PNG heat map: colour is the share of each true class's faces given
    each answer (the diagonal is the recall), each cell also shows its count and share.

    Needs matplotlib (the ``plot`` extra): raises :class:`fer_swarm.charts.ChartsUnavailable` without it.
    """
    k = len(report.classes)
    fig = charts.figure(figsize=(2.2 + 0.95 * k, 1.6 + 0.85 * k), layout="constrained")
    from matplotlib.ticker import PercentFormatter

    support = report.confusion.sum(axis=1)
    shares = report.confusion / np.maximum(support[:, None], 1)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    bar = fig.colorbar(image, ax=ax, format=PercentFormatter(1.0), shrink=0.85)
    bar.set_label("share of the true class's faces (diagonal: recall)")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{report.confusion[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), report.classes, rotation=35, ha="right")
    ax.set_yticks(range(k), [f"{c} ({n})" for c, n in zip(report.classes, support)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (faces)")
    ax.set_title(f"{title}\naccuracy {report.accuracy:.1%}, macro-F1 {report.macro_f1:.3f}, n = {report.n} faces",
                 fontsize=10)
    return charts.save(fig, path)
