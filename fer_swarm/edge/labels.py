"""The label a person sees on a face: its track's answers over time, not one frame's.

No sockets and no clock: answers come with their frame's time in the source.

One model answer is noisy (FER2013 models are right about two times in three),
so showing each frame's answer makes labels flicker on a face whose
expression does not change. Averaging answers steadies the label but delays a
real change. The filter here is the exact answer to "what is this face's
expression now, given its answers so far", for a face whose expression
changes now and then (a hidden Markov model, forward pass):

- between answers, belief leaks towards "any expression" at the rate at
  which expressions change: after ``memory_ms`` without answers about 63% of
  it is gone, so old answers fade by time, not by frame count;
- each answer multiplies the belief by the model's probabilities raised to
  ``answer_weight`` (below 1 would count one answer as weaker evidence than
  its softmax claims; measured, 1 followed changes best at no cost in
  steadiness, because the relabel budget already spaces answers apart).

Defaults (100 ms, 1.0, margin 0.2) were chosen by ``bench/smoothing.py``:
replaying the same answers through this filter, an exponential average with
a switching margin and "switch after k agreeing answers", this one kept
label changes low on a clip of faces that keep their expression while still
following changes on a clip where they change (docs/performance.md).

So one stray answer moves a settled belief only a little, while two or three
agreeing answers for a new expression overturn it, faster when they are
confident. The shown label switches to the belief's top class only when that
leads the label shown now by ``switch_margin``: a face halfway between two
expressions (sad or neutral, 50/50) keeps one label instead of flipping
between them. The shown probabilities are the belief, and the second-label
rule reads them. ``--no-smoothing`` shows each track's latest answer instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LabelFilter", "LatestAnswer", "TrackLabels"]

_FLOOR = 1e-3  # no class is ever ruled out by one answer


class LabelFilter:
    """The belief over labels for one track."""

    def __init__(self, n_labels: int, *, memory_ms: float, answer_weight: float):
        self.memory_s = memory_ms / 1000
        self.weight = answer_weight
        self.belief = np.full(n_labels, 1.0 / n_labels)
        self.t: float | None = None

    def update(self, probabilities: np.ndarray, t: float) -> None:
        """Take one answer for the crop of time ``t`` (answers older than the last one are ignored)."""
        if self.t is not None:
            if t < self.t:
                return
            if self.memory_s > 0:
                stay = math.exp(-(t - self.t) / self.memory_s)
                self.belief = stay * self.belief + (1 - stay) / len(self.belief)
            else:
                self.belief = np.full(len(self.belief), 1.0 / len(self.belief))
        evidence = np.maximum(np.asarray(probabilities, dtype=np.float64), _FLOOR) ** self.weight
        b = self.belief * evidence
        self.belief = b / b.sum()
        self.t = t


class LatestAnswer:
    """No smoothing: the track shows its most recent answer."""

    def __init__(self, n_labels: int):
        self.belief = np.full(n_labels, 1.0 / n_labels)
        self.t: float | None = None

    def update(self, probabilities: np.ndarray, t: float) -> None:
        if self.t is None or t >= self.t:
            self.belief = np.asarray(probabilities, dtype=np.float64)
            self.t = t


@dataclass(frozen=True)
class Shown:
    label: str
    probabilities: dict[str, float]


class TrackLabels:
    """Every live track's label state, by track id. Bounded: forget tracks the tracker dropped."""

    def __init__(self, labels: Sequence[str], *, smoothing: bool = True, memory_ms: float = 100,
                 answer_weight: float = 1.0, switch_margin: float = 0.2, max_age_ms: float = 1000):
        self.labels = tuple(labels)
        self.smoothing = smoothing
        self.switch_margin = switch_margin if smoothing else 0.0
        self.max_age_s = max_age_ms / 1000
        self._label: dict[int, int] = {}  # the label each track shows now, by index
        self.memory_ms = memory_ms
        self.answer_weight = answer_weight
        self._state: dict[int, LabelFilter | LatestAnswer] = {}

    def answer(self, track: int, probabilities: Mapping[str, float], t: float) -> None:
        """Record the model's answer for ``track``'s crop from the frame at time ``t``."""
        state = self._state.get(track)
        if state is None:
            n = len(self.labels)
            state = self._state[track] = (LabelFilter(n, memory_ms=self.memory_ms, answer_weight=self.answer_weight)
                                          if self.smoothing else LatestAnswer(n))
        state.update(np.array([probabilities.get(k, 0.0) for k in self.labels]), t)

    def shown(self, track: int, t: float | None = None) -> Shown | None:
        """The label and probabilities to show for ``track`` in the frame at time ``t``; None before its
        first answer, or when its newest answer is more than ``max_age_ms`` older than ``t`` (the pool
        has stopped answering: an old label is not passed off as a current one)."""
        state = self._state.get(track)
        if state is None or state.t is None:
            return None
        if t is not None and t - state.t > self.max_age_s:
            return None
        b = state.belief
        top, now = int(np.argmax(b)), self._label.get(track)
        # Hysteresis: between two near-equal labels the shown one stays until the other clearly leads.
        if now is None or b[top] - b[now] >= self.switch_margin:
            now = self._label[track] = top
        return Shown(self.labels[now], {k: round(float(v), 4) for k, v in zip(self.labels, b)})

    def keep_only(self, tracks: set[int]) -> None:
        """Forget every track not in ``tracks``."""
        for gone in self._state.keys() - tracks:
            del self._state[gone]
            self._label.pop(gone, None)
