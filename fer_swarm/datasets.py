"""Folder-per-class image datasets: one subfolder per class, images inside.

This is the layout Keras' ``flow_from_directory`` expects and the one
``fer-swarm train``, ``eval`` and ``dataset crop`` read. Scanning is strict
(no classes, an empty class: :class:`DatasetError`); reading is forgiving
(an unreadable image is reported and skipped, never fatal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff"})


@dataclass(frozen=True)
class ClassFolders:
    """The classes of a dataset (sorted folder names) and the image files of each."""

    root: Path
    classes: tuple[str, ...]
    files: dict[str, tuple[Path, ...]]

    def counts(self) -> dict[str, int]:
        return {c: len(self.files[c]) for c in self.classes}

    def __len__(self) -> int:
        return sum(len(f) for f in self.files.values())


def scan(root: str | Path, *, allow_empty_class: bool = False) -> ClassFolders:
    """List the classes and images of a folder-per-class dataset.

    Raises DatasetError if ``root`` is not a folder, has no class subfolders,
    or (unless ``allow_empty_class``) a class folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{root}: no class subfolders (expected one folder per class, e.g. {root}/happy/*.jpg)")
    files = {
        d.name: tuple(sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        for d in class_dirs
    }
    empty = [c for c, f in files.items() if not f]
    if empty and not allow_empty_class:
        raise DatasetError(f"{root}: class folder(s) with no images: {', '.join(empty)}")
    return ClassFolders(root=root, classes=tuple(d.name for d in class_dirs), files=files)


@dataclass
class LoadedImages:
    """Images of one dataset as an (N, H, W) uint8 array, their class indices, and what failed."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    unreadable: list[Path] = field(default_factory=list)


def read_gray(path: Path) -> np.ndarray | None:
    """Read an image file as 8-bit gray, or None if it cannot be decoded."""
    import cv2  # local: keeps `import fer_swarm.datasets` light for the broker's process

    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None or data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def load_gray(folders: ClassFolders, size: tuple[int, int], classes: tuple[str, ...] | None = None) -> LoadedImages:
    """Read every image as gray, resized to ``size`` (width, height).

    ``classes`` fixes the label order (a model's labels); a dataset class the
    model does not know is a DatasetError. Unreadable files are logged and
    listed in ``unreadable``, not raised.
    """
    import cv2

    classes = classes or folders.classes
    unknown = [c for c in folders.classes if c not in classes]
    if unknown:
        raise DatasetError(f"{folders.root}: classes not known to the model: {', '.join(unknown)} (model knows {', '.join(classes)})")
    n = len(folders)
    images = np.empty((n, size[1], size[0]), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    bad: list[Path] = []
    i = 0
    for c in folders.classes:
        for path in folders.files[c]:
            img = read_gray(path)
            if img is None:
                log.warning("unreadable image skipped: %s", path)
                bad.append(path)
                continue
            if img.shape[::-1] != size:
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            images[i] = img
            labels[i] = classes.index(c)
            i += 1
    if i == 0:
        raise DatasetError(f"{folders.root}: no readable images")
    return LoadedImages(images=images[:i], labels=labels[:i], classes=tuple(classes), unreadable=bad)
