"""``fer-swarm dataset crop``: the offline half of the prototype's image scraper.

Turns a folder-per-class set of ordinary photos into a folder-per-class set
of face crops, found and preprocessed by the same code the edge client runs
(:mod:`fer_swarm.faces`), so what the model trains on is what it will be
shown live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from .. import datasets
from ..faces import FaceDetector, YuNetDetector, crop_face, to_gray
from ..framing import framing_for
from ..model import ModelCard

log = logging.getLogger(__name__)


@dataclass
class ClassTally:
    photos: int = 0
    crops: int = 0
    no_face: int = 0
    several_faces: int = 0
    unreadable: list[Path] = field(default_factory=list)


def crop_dataset(
    raw_dir: Path,
    out_dir: Path,
    *,
    card: ModelCard,
    detector: FaceDetector | None = None,
    progress=None,
) -> dict[str, ClassTally]:
    """Write one crop per detected face to OUT_DIR/CLASS/PHOTO-N.png; return the tally per class.

    Crops are sized and framed as ``card`` (the model's sidecar) says for this
    detector, exactly as the edge crops live faces for a pool running that model.
    ``progress``, if given, is called once per photo (for a progress bar).
    Unreadable files are counted and skipped.
    """
    folders = datasets.scan(raw_dir, allow_empty_class=True)
    detector = detector or YuNetDetector(detect_width_px=640)
    framing = framing_for(card.framing, detector.name)
    size = (card.preprocessing.width_px, card.preprocessing.height_px)
    tallies: dict[str, ClassTally] = {}
    for cls in folders.classes:
        tally = tallies[cls] = ClassTally()
        target = out_dir / cls
        target.mkdir(parents=True, exist_ok=True)
        for path in folders.files[cls]:
            tally.photos += 1
            image = datasets.read_gray(path)
            if progress:
                progress()
            if image is None:
                log.warning("unreadable image skipped: %s", path)
                tally.unreadable.append(path)
                continue
            gray = to_gray(image)
            faces = detector.detect(gray)
            if not faces:
                tally.no_face += 1
            elif len(faces) > 1:
                tally.several_faces += 1
            for n, face in enumerate(faces):
                cv2.imwrite(str(target / f"{path.stem}-{n}.png"), crop_face(gray, face, size, framing))
                tally.crops += 1
    return tallies


def count_photos(raw_dir: Path) -> int:
    return len(datasets.scan(raw_dir, allow_empty_class=True))
