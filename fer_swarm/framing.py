"""The crop framing a model was trained on: how a detector's face box becomes the model's crop.

A model learns faces framed one way (FER2013's 48x48 crops show the whole
face, brows to chin, with a little forehead and cheek around it), and a
detector boxes faces another way (YuNet's box runs from the hairline to the
chin and is taller than wide; Haar's is a tight square). The mapping between
the two is a property of the model, not of the edge, so it lives in the
model's sidecar and travels to the edge in WELCOME: the edge and
``fer-swarm dataset crop`` both read it from there, and a model trained on
other crops brings its own.

The crop is a square, in frame pixels:

- side   = ``scale`` x the box's longer side;
- centre = the box's centre + (``shift_x``, ``shift_y``) x the box's longer side
  (positive ``shift_y`` moves the crop down);
- rotated by the eye line when ``align_eyes`` is on and the detector gives
  landmarks, so a tilted head is cut upright.

This module has no OpenCV and no model runtime: the protocol (and so the
broker) imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Framing", "DEFAULT_FRAMINGS", "framing_for"]


class Framing(BaseModel):
    """How one detector's box maps to the crop square a model was trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(1.2, gt=0.2, le=4.0, description="crop side as a multiple of the box's longer side")
    shift_x: float = Field(0.0, ge=-1.0, le=1.0, description="crop centre shift right, as a fraction of the box's longer side")
    shift_y: float = Field(0.0, ge=-1.0, le=1.0, description="crop centre shift down, as a fraction of the box's longer side")
    align_eyes: bool = Field(False, description="rotate the crop so the eyes are level (needs landmarks)")


# FER2013's framing, for models trained on FER2013-style crops whose sidecar has
# no "framing" block. Fitted by bench/calibrate_framing.py on clips built from
# FER2013 val/ (docs/performance.md, "Crop framing"): the median ratio of the
# pasted training square to each detector's box. A YuNet box runs from the
# hairline to the chin, about the height of a FER2013 crop; a Haar box is
# about 5% smaller than one.
DEFAULT_FRAMINGS: dict[str, Framing] = {
    "yunet": Framing(scale=1.01, shift_y=-0.025),
    "haar": Framing(scale=1.05),
}


def framing_for(declared: Mapping[str, Framing], detector: str) -> Framing:
    """The framing a model declares for ``detector``; FER2013's where it declares none."""
    return declared.get(detector) or DEFAULT_FRAMINGS.get(detector) or Framing()
