"""The relabel budget: which tracks' crops a frame sends for inference.

A headset at 30 fps with six faces would send 180 crops a second if every
face went out in every frame, and most of those answers repeat the last one.
A track is sent again only when its label may have gone stale:

- at once when it is new (a face without a label is what a viewer must not see);
- when its box moved or changed size a lot since the crop last sent (the face
  turned, came closer, or the tracker's box slipped);
- otherwise at most every ``interval_ms`` (of the source's time), which bounds
  the pool's work per face: 1000 / ``interval_ms`` jobs per face per second.

``interval_ms`` 0 sends every face in every frame (today's behaviour).
"""

from __future__ import annotations

from .tracks import Track

__all__ = ["RelabelBudget"]


class RelabelBudget:
    """Decides, per track and frame, whether its crop is sent. Stores its state on the track."""

    def __init__(self, interval_ms: float, *, move_fraction: float = 0.3, resize_fraction: float = 0.25):
        self.interval_s = interval_ms / 1000
        self.move_fraction = move_fraction
        self.resize_fraction = resize_fraction

    def due(self, track: Track, t: float) -> bool:
        """Whether ``track``'s crop from the frame at time ``t`` should be sent."""
        if track.missed:
            return False  # no fresh detection: nothing new to crop
        if track.sent_s is None or track.sent_box is None or t - track.sent_s >= self.interval_s:
            return True
        old, new = track.sent_box, track.box
        (ox, oy), (nx, ny) = old.centre, new.centre
        moved = ((nx - ox) ** 2 + (ny - oy) ** 2) ** 0.5 > self.move_fraction * old.side
        resized = abs(new.side - old.side) > self.resize_fraction * old.side
        return moved or resized

    def sent(self, track: Track, t: float) -> None:
        track.sent_s = t
        track.sent_box = track.box
