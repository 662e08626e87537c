"""Face tracks: the same face keeps one identity from frame to frame.

No sockets and no clock: :meth:`Tracker.update` takes each frame's faces and
its time in the source (seconds), so the rules are tested alone and exactly.

The rules, and why:

- A detection joins the track whose predicted box it overlaps most (IoU at
  least ``min_iou``), greedily, best pair first; a face that moved further than
  its box in one frame joins by centre distance when its size agrees. A track
  predicts its box from its recent velocity, so two faces that cross keep
  their own tracks. For a handful of faces this is all a tracker needs
  (SORT-style association without the Kalman filter's tuning); Hungarian
  matching would only matter with many overlapping faces.
- A track survives missed detections for ``keep_ms`` (one detector miss must not
  restart the face's label), and is shown at its predicted box for
  ``hold_ms`` of them: a flicker of the detector does not make a box blink,
  while a face that really leaves loses its box within ``hold_ms``.
- A track is shown (and sent) once it is confirmed: detected in two frames,
  or once with a confident score (``confirm_score``). A detector's one-frame
  false box on a textured wall then never gets a label, at the cost of one
  frame's delay for a face the detector is unsure of.
- Track ids count up from 1 and are never reused within a run, so a reply or
  an event that names a track can never be taken for another face.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..faces import Box, Face

__all__ = ["Track", "Tracker"]


@dataclass
class Track:
    """One face followed over time. ``face`` is its latest detection; ``box`` is where it is shown now."""

    id: int
    face: Face
    born_s: float
    seen_s: float
    box: Box
    hits: int = 1
    velocity: tuple[float, float] = (0.0, 0.0)  # centre, px/s
    missed: bool = False  # not detected in the latest frame (shown at its predicted box)
    confirmed: bool = False  # seen often or surely enough to be shown
    # Set by the relabel budget: when and where its crop was last sent.
    sent_s: float | None = None
    sent_box: Box | None = field(default=None, repr=False)

    def predicted(self, t: float) -> Box:
        """Its last box moved by its velocity to time ``t``."""
        dt = max(0.0, t - self.seen_s)
        b = self.face.box
        return Box(round(b.x + self.velocity[0] * dt), round(b.y + self.velocity[1] * dt), b.w, b.h)


class Tracker:
    """Gives each face a track id that lives while the face stays in view. Not thread-safe."""

    def __init__(self, *, keep_ms: float = 500, hold_ms: float = 250, min_iou: float = 0.2, enabled: bool = True,
                 confirm_score: float = 0.7):
        if hold_ms > keep_ms:
            raise ValueError("hold_ms cannot exceed keep_ms: a track is shown only while it is kept")
        self.confirm_score = confirm_score
        self.keep_s = keep_ms / 1000
        self.hold_s = hold_ms / 1000
        self.min_iou = min_iou
        self.enabled = enabled
        self._ids = itertools.count(1)
        self._tracks: list[Track] = []
        self.started = 0  # tracks started so far (the ids given out)

    @property
    def tracks(self) -> list[Track]:
        """Every live track, including those missed lately."""
        return list(self._tracks)

    def update(self, faces: list[Face], t: float) -> list[Track]:
        """Match the faces of the frame at time ``t`` (seconds) to tracks; return the tracks to show.

        Those are the confirmed tracks' detected faces (in ``faces`` order) and
        then the confirmed tracks missed for at most ``hold_ms``, at their
        predicted box. With tracking off, every face is a new track, shown at
        once: the per-frame behaviour.
        """
        self._tracks = [tr for tr in self._tracks if t - tr.seen_s <= self.keep_s]
        if not self.enabled:
            self._tracks = []
        pairs = self._match(faces, t)
        shown: list[Track] = []
        for i, face in enumerate(faces):
            track = pairs.get(i)
            if track is None:
                track = Track(id=next(self._ids), face=face, born_s=t, seen_s=t, box=face.box)
                self.started += 1
                self._tracks.append(track)
            else:
                dt = t - track.seen_s
                if dt > 0:
                    (ox, oy), (nx, ny) = track.face.box.centre, face.box.centre
                    v = ((nx - ox) / dt, (ny - oy) / dt)
                    # Half old, half new: steady through detector jitter, quick to follow a turn.
                    track.velocity = (0.5 * track.velocity[0] + 0.5 * v[0], 0.5 * track.velocity[1] + 0.5 * v[1])
                track.face, track.seen_s, track.box, track.missed = face, t, face.box, False
                track.hits += 1
            if not track.confirmed and (not self.enabled or track.hits >= 2
                                        or (face.score is not None and face.score >= self.confirm_score)):
                track.confirmed = True
            shown.append(track)
        matched = {id(tr) for tr in shown}
        for track in self._tracks:
            if id(track) not in matched and t > track.seen_s:
                track.missed = True
                if t - track.seen_s <= self.hold_s:
                    track.box = track.predicted(t)
                    shown.append(track)
        return [tr for tr in shown if tr.confirmed]

    def _match(self, faces: list[Face], t: float) -> dict[int, Track]:
        """Face index -> track, greedily by overlap with each track's predicted box, then by distance."""
        if not faces or not self._tracks:
            return {}
        predicted = [tr.predicted(t) for tr in self._tracks]
        candidates = []
        for i, face in enumerate(faces):
            for j, box in enumerate(predicted):
                iou = face.box.iou(box)
                if iou >= self.min_iou:
                    candidates.append((iou, i, j))
                elif _near(face.box, box):
                    candidates.append((0.0, i, j))  # a fast face: after every overlapping pair
        taken_faces: set[int] = set()
        taken_tracks: set[int] = set()
        pairs: dict[int, Track] = {}
        for _, i, j in sorted(candidates, key=lambda c: (-c[0], _distance(faces[c[1]].box, predicted[c[2]]))):
            if i in taken_faces or j in taken_tracks:
                continue
            taken_faces.add(i)
            taken_tracks.add(j)
            pairs[i] = self._tracks[j]
        return pairs


def _distance(a: Box, b: Box) -> float:
    (ax, ay), (bx, by) = a.centre, b.centre
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5


def _near(a: Box, b: Box) -> bool:
    """Centres within one box side of each other, and sizes within a factor of 1.5."""
    ratio = a.side / max(1, b.side)
    return _distance(a, b) <= max(a.side, b.side) and 1 / 1.5 <= ratio <= 1.5
