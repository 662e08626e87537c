"""Where shown frames go: a window, an annotated video file, a JSON-lines events file; each optional.

Closing matters as much as writing: :meth:`Outputs.close` releases the video
writer, which is what writes the mp4's index (a file never released does not
play), and every event line is written whole and flushed as its frame is shown.
"""

from __future__ import annotations

import json
from typing import IO

import cv2
import numpy as np

from ..config import EdgeSettings
from ..errors import FerSwarmError
from .draw import draw_faces
from .pipeline import ShownFrame

__all__ = ["DEFAULT_FPS", "WINDOW_TITLE", "Outputs"]

WINDOW_TITLE = "fer-swarm edge (q or Esc to quit)"
DEFAULT_FPS = 30.0


class Outputs:
    """Window, annotated video and events file; each optional."""

    def __init__(self, settings: EdgeSettings, *, window: bool, fps: float | None):
        self.settings = settings
        self.window = window
        self.fps = fps or DEFAULT_FPS
        self.quit = False
        self._sized = False
        self._writer: cv2.VideoWriter | None = None
        self._events: IO[str] | None = None
        if settings.events is not None:
            try:
                self._events = open(settings.events, "w", encoding="utf-8")
            except OSError as e:
                raise FerSwarmError(f"cannot write events to {settings.events}: {e.strerror}") from e
        if window:
            cv2.namedWindow(WINDOW_TITLE, cv2.WINDOW_NORMAL)

    def show(self, shown: ShownFrame) -> None:
        if self._events is not None:
            for record in shown.events():
                self._events.write(json.dumps(record) + "\n")
            self._events.flush()  # a line per face as it happens, for `tail -f` consumers
        if not (self.window or self.settings.output is not None):
            return
        image = draw_faces(shown.image, shown.faces, second_label_threshold=self.settings.second_label_threshold)
        if self.settings.output is not None:
            self._write(image)
        if self.window and not self.quit:  # frames flushed after q/Esc are written, not shown
            if not self._sized:  # WINDOW_NORMAL opens small; show frames at their own size until the user resizes
                cv2.resizeWindow(WINDOW_TITLE, image.shape[1], image.shape[0])
                self._sized = True
            cv2.imshow(WINDOW_TITLE, image)
            key = cv2.waitKey(1) & 0xFF
            if key in (ord("q"), 27) or cv2.getWindowProperty(WINDOW_TITLE, cv2.WND_PROP_VISIBLE) < 1:
                self.quit = True

    def _write(self, image: np.ndarray) -> None:
        if self._writer is None:
            height, width = image.shape[:2]
            path = str(self.settings.output)
            self._writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not self._writer.isOpened():
                raise FerSwarmError(f"cannot write video to {path} (mp4v); does its folder exist?")
        self._writer.write(image)

    def close(self) -> None:
        """Close each output, even if closing another failed: the video's index is written here."""
        try:
            if self._events is not None:
                self._events.close()
        finally:
            if self._writer is not None:
                self._writer.release()
        if self.window:
            cv2.destroyWindow(WINDOW_TITLE)
            cv2.waitKey(1)  # lets HighGUI actually close the window
