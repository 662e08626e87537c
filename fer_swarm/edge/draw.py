"""Drawing a shown frame: a labelled box per face.

An answered face gets a solid box and "label p", plus " / second p" when the
runner-up is likely enough to matter (expressions blend: the prototype showed
"top / second" and viewers found it useful). A face without a label gets a
dashed box in another colour and its error kind, so a missing answer never
looks like an answer. Text size follows the frame, not the face, so labels on
small faces stay readable; the label sits above the box, moved inside the
frame when the box touches an edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .pipeline import TIMEOUT, FaceOutcome

__all__ = ["label_text", "draw_faces"]

# BGR colours.
ANSWERED = (60, 200, 60)
NO_ANSWER = (0, 170, 255)  # amber: the pool was too slow for this frame
FAILED = (40, 40, 230)  # red: the pool or the edge said the job failed
TEXT = (0, 0, 0)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_DASH_PX = 8


def label_text(face: FaceOutcome, second_label_threshold: float) -> str:
    """``"happy 0.81"``, ``"happy 0.55 / sad 0.31"`` when the second is at least the
    threshold, or the error kind (``"TIMEOUT"``, ``"BUSY"``...) for a face without a label."""
    ranked = face.ranked()
    if face.error is not None or not ranked:
        return face.error or TIMEOUT
    (top, p), rest = ranked[0], ranked[1:]
    text = f"{top} {p:.2f}"
    if rest and rest[0][1] >= second_label_threshold:
        text += f" / {rest[0][0]} {rest[0][1]:.2f}"
    return text


def draw_faces(image: np.ndarray, faces: Sequence[FaceOutcome], *, second_label_threshold: float = 0.25) -> np.ndarray:
    """A copy of the BGR ``image`` with every face's box and label drawn on it."""
    out = image.copy()
    height = out.shape[0]
    # Text scaled to the frame: 0.5 at 480 lines, never below the smallest legible size.
    scale = max(0.4, min(1.2, height / 960))
    thickness = 1 if scale < 0.8 else 2
    for face in faces:
        colour = ANSWERED if face.answered else NO_ANSWER if face.error == TIMEOUT else FAILED
        b = face.box
        p0, p1 = (b.x, b.y), (b.x + b.w - 1, b.y + b.h - 1)
        if face.answered:
            cv2.rectangle(out, p0, p1, colour, 2, cv2.LINE_AA)
        else:
            _dashed_rectangle(out, p0, p1, colour, 2)
        _label(out, label_text(face, second_label_threshold), b.x, b.y, colour, scale, thickness)
    return out


def _label(out: np.ndarray, text: str, x: int, top: int, colour, scale: float, thickness: int) -> None:
    """Text on a filled tag above the box; below its top edge when there is no room above;
    shifted left when it would run off the right edge."""
    height, width = out.shape[:2]
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = 3
    tag_w, tag_h = tw + 2 * pad, th + base + 2 * pad
    x0 = min(max(0, x), max(0, width - tag_w))
    y0 = top - tag_h if top - tag_h >= 0 else min(max(0, top), max(0, height - tag_h))
    cv2.rectangle(out, (x0, y0), (x0 + tag_w, y0 + tag_h), colour, cv2.FILLED)
    cv2.putText(out, text, (x0 + pad, y0 + pad + th), _FONT, scale, TEXT, thickness, cv2.LINE_AA)


def _dashed_rectangle(out: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], colour, thickness: int) -> None:
    (x0, y0), (x1, y1) = p0, p1
    for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]))
        for s in range(0, length, 2 * _DASH_PX):
            e = min(s + _DASH_PX, length)
            start = (a[0] + (b[0] - a[0]) * s // max(length, 1), a[1] + (b[1] - a[1]) * s // max(length, 1))
            end = (a[0] + (b[0] - a[0]) * e // max(length, 1), a[1] + (b[1] - a[1]) * e // max(length, 1))
            cv2.line(out, start, end, colour, thickness, cv2.LINE_AA)
