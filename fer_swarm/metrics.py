"""Classification metrics on label arrays: plain numpy, shared by train and eval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Report:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows: truth)."""

    classes: tuple[str, ...]
    confusion: np.ndarray
    n: int
    accuracy: float
    macro_f1: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {
                c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for c, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.confusion.sum(axis=1))
            },
            "confusion": {"labels": list(self.classes), "rows_truth_cols_predicted": self.confusion.tolist()},
        }


def classification_report(truth: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> Report:
    """Compare true and predicted class indices. A class with no support or no predictions scores 0."""
    k = len(classes)
    cm = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / cm.sum(axis=0))
        recall = np.nan_to_num(tp / cm.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    present = cm.sum(axis=1) > 0
    n = int(cm.sum())
    return Report(
        classes=tuple(classes),
        confusion=cm,
        n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        precision=precision,
        recall=recall,
        f1=f1,
    )


def format_confusion(report: Report) -> str:
    """The confusion matrix as aligned text, truth in rows, prediction in columns."""
    w = max(6, *(len(c) for c in report.classes))
    head = " " * (w + 2) + " ".join(f"{c[:w]:>{w}}" for c in report.classes)
    rows = [f"{c:>{w}}  " + " ".join(f"{v:>{w}d}" for v in row) for c, row in zip(report.classes, report.confusion)]
    return "\n".join([head, *rows])
