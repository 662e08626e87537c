"""Where the edge's frames come from: a camera, a video file, or a folder of images.

Every source yields :class:`Frame` values ``(index, time_s, bgr)`` in order.
``index`` counts frames of the source, so frames skipped to keep up leave
gaps; ``time_s`` is the frame's time in the source (file position, or seconds
since a camera started).

Real time comes first: with ``realtime`` on, capture never waits for the
consumer. A camera is read by its own thread that keeps only the newest
frame; a file is read at its own frame rate and frames whose time has passed
are skipped. With ``realtime`` off every frame is delivered, as fast as it is
consumed. A source waits through the ``wait(seconds)`` it is given, so the
edge can handle replies while it waits for the next frame instead of sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np

from ..datasets import IMAGE_SUFFIXES
from ..errors import FerSwarmError

__all__ = ["Frame", "FrameSource", "CameraSource", "VideoSource", "ImageFolderSource", "open_source"]

log = logging.getLogger(__name__)

Wait = Callable[[float], None]
Clock = Callable[[], float]

# A camera that fails this many reads in a row is taken as gone (unplugged, closed).
_CAMERA_MAX_FAILED_READS = 10
# How often a consumer waiting for a camera frame gets control back, in seconds.
_CAMERA_POLL_S = 0.005


class Frame(NamedTuple):
    """One frame: its number in the source, its time in seconds, and its BGR pixels."""

    index: int
    time_s: float
    bgr: np.ndarray


class FrameSource(Protocol):
    """What the edge reads frames from. ``realtime``: frames may be skipped to keep up."""

    kind: str
    fps: float | None
    realtime: bool

    def frames(self, wait: Wait = time.sleep) -> Iterator[Frame]: ...

    def close(self) -> None: ...


class _Closing:
    def __iter__(self) -> Iterator[Frame]:
        return self.frames()  # type: ignore[attr-defined]

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


class CameraSource(_Closing):
    """A camera by index (``cv2.VideoCapture(index)``), or any object with the same
    ``isOpened``/``read``/``release`` methods passed as ``capture``."""

    kind = "camera"
    frame_count = None  # a camera has no end

    def __init__(self, index: int = 0, *, capture: Any = None, realtime: bool = True, clock: Clock = time.monotonic):
        self._cap = _quietly(cv2.VideoCapture, index) if capture is None else capture
        if not self._cap.isOpened():
            self._cap.release()
            raise FerSwarmError(f"cannot open camera {index}: no such camera, or another program is using it")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0) if hasattr(self._cap, "get") else 0.0
        self.fps = fps if fps > 0 else None
        self.index = index
        self.realtime = realtime
        self._clock = clock
        self._lock = threading.Lock()
        self._newest: Frame | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def frames(self, wait: Wait = time.sleep) -> Iterator[Frame]:
        if not self.realtime:
            yield from self._read_in_turn()
            return
        self._thread = threading.Thread(target=self._capture, name=f"camera-{self.index}", daemon=True)
        self._thread.start()
        last = -1
        while True:
            with self._lock:
                frame = self._newest
            if frame is not None and frame.index > last:
                if frame.index > last + 1 and last >= 0:
                    log.debug("camera %d: %d frame(s) replaced by newer ones", self.index, frame.index - last - 1)
                last = frame.index
                yield frame
            elif not self._thread.is_alive():
                return
            else:
                wait(_CAMERA_POLL_S)

    def _read_in_turn(self) -> Iterator[Frame]:
        """Without a capture thread: each frame is read when the consumer asks for it."""
        start, failed, n = self._clock(), 0, 0
        while not self._stop.is_set() and failed < _CAMERA_MAX_FAILED_READS:
            ok, image = self._cap.read()
            if not ok or image is None:
                failed += 1
                continue
            failed = 0
            yield Frame(n, self._clock() - start, image)
            n += 1
        if failed:
            log.warning("camera %d stopped delivering frames", self.index)

    def _capture(self) -> None:
        """The capture thread: read as fast as the camera delivers, keep only the newest."""
        start, failed, n = self._clock(), 0, 0
        while not self._stop.is_set():
            ok, image = self._cap.read()
            if not ok or image is None:
                failed += 1
                if failed >= _CAMERA_MAX_FAILED_READS:
                    log.warning("camera %d stopped delivering frames", self.index)
                    return
                time.sleep(0.01)  # a failing camera often fails at once; do not spin
                continue
            failed = 0
            with self._lock:
                self._newest = Frame(n, self._clock() - start, image)
            n += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                log.warning("camera %d: capture thread did not stop within 2 s", self.index)
        self._cap.release()


class VideoSource(_Closing):
    """A video file, read with OpenCV."""

    kind = "video"

    def __init__(self, path: str | Path, *, realtime: bool = False, clock: Clock = time.monotonic):
        self.path = Path(path)
        if not self.path.is_file():
            raise FerSwarmError(f"video file not found: {self.path}")
        self._cap = _quietly(cv2.VideoCapture, str(self.path))
        if not self._cap.isOpened():
            self._cap.release()
            raise FerSwarmError(f"cannot read video {self.path}: not a video format OpenCV can decode")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0)
        self.fps = fps if 0 < fps < 1000 else None
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if count > 0 else None  # from the container's header: an estimate for some formats
        if realtime and self.fps is None:
            log.warning("%s: frame rate unknown; reading every frame as fast as it is consumed", self.path)
        self.realtime = realtime and self.fps is not None
        self._clock = clock
        self.skipped = 0

    def frames(self, wait: Wait = time.sleep) -> Iterator[Frame]:
        n = 0
        start: float | None = None
        while True:
            if self.realtime:
                assert self.fps is not None
                start = self._clock() if start is None else start
                # Behind: skip every frame whose successor is already due (grab() does not decode).
                while self._clock() - start >= (n + 1) / self.fps:
                    if not self._cap.grab():
                        return
                    n += 1
                    self.skipped += 1
                while (ahead := start + n / self.fps - self._clock()) > 0:
                    wait(ahead)
            ok, image = self._cap.read()
            if not ok or image is None:
                if n == 0:
                    raise FerSwarmError(f"cannot read video {self.path}: no frame could be decoded")
                return
            time_s = n / self.fps if self.fps else self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            yield Frame(n, time_s, image)
            n += 1

    def close(self) -> None:
        self._cap.release()


class ImageFolderSource(_Closing):
    """The images of a folder, in name order. Unreadable images are logged and skipped.
    Images have no frame rate: ``time_s`` is the time since the first was read."""

    kind = "images"
    fps = None
    realtime = False

    def __init__(self, folder: str | Path, *, clock: Clock = time.monotonic):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FerSwarmError(f"image folder not found: {self.folder}")
        self.files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FerSwarmError(f"no images in {self.folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        self.frame_count = len(self.files)
        self._clock = clock
        self.unreadable: list[Path] = []

    def frames(self, wait: Wait = time.sleep) -> Iterator[Frame]:
        start = self._clock()
        for n, path in enumerate(self.files):
            data = np.fromfile(str(path), dtype=np.uint8)  # fromfile+imdecode: non-ASCII paths work too
            image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
            if image is None:
                log.warning("unreadable image skipped: %s", path)
                self.unreadable.append(path)
                continue
            yield Frame(n, self._clock() - start, image)

    def close(self) -> None:
        pass


def _quietly(fn, *args):
    """Call an OpenCV function with its native logging off: a missing camera or a broken file makes
    OpenCV print a screenful from C++, and the one-line error this module raises says what matters."""
    logging_ = cv2.utils.logging
    level = logging_.getLogLevel()
    logging_.setLogLevel(logging_.LOG_LEVEL_SILENT)
    try:
        return fn(*args)
    finally:
        logging_.setLogLevel(level)


def open_source(
    *, camera: int | None = None, video: Path | None = None, images: Path | None = None, realtime: bool | None = None
) -> CameraSource | VideoSource | ImageFolderSource:
    """The one source given; ``realtime`` None means on for a camera, off for files."""
    if camera is not None:
        return CameraSource(camera, realtime=True if realtime is None else realtime)
    if video is not None:
        return VideoSource(video, realtime=bool(realtime))
    if images is not None:
        if realtime:
            log.info("--realtime has no effect on a folder of images (they have no frame rate)")
        return ImageFolderSource(images)
    raise FerSwarmError("no frame source: give --camera INDEX, --video FILE or --images FOLDER")
