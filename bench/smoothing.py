#!/usr/bin/env python3
"""Label smoothing designs, replayed side by side on the same answers (issue 10, point 4).

Steady labels pull against following a real change. To compare designs on
exactly the same model answers, run the real edge once with tracks but
without smoothing and with every face sent in every frame, so its events
hold each track's raw answer for every frame:

    python bench/edge_quality.py --variants yunet+track --clips moving,changing

then replay those answers here through each design, each under a relabel
budget (a track's answer is used at most every R ms of video time, as the
edge would have asked for it), and score the labels it would have shown
with the same scorer as the edge runs:

    python bench/smoothing.py bench-out/quality

The designs: none (the latest answer), an exponential moving average of the
probabilities with a switching margin (the textbook smoother), "switch after
k agreeing answers", and the edge's filter (fer_swarm.edge.labels) at several
settings.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fer_swarm.bench.quality import read_jsonl, score
from fer_swarm.edge.labels import TrackLabels


class Ema:
    """Exponential average of probabilities with time constant ``tau_ms``; switch when a label leads by ``margin``."""

    def __init__(self, labels, tau_ms: float, margin: float):
        self.labels, self.tau, self.margin = labels, tau_ms / 1000, margin
        self.p: dict[int, np.ndarray] = {}
        self.t: dict[int, float] = {}
        self.shown_label: dict[int, int] = {}

    def answer(self, track, probs, t):
        v = np.array([probs[k] for k in self.labels])
        if track not in self.p:
            self.p[track], self.t[track], self.shown_label[track] = v, t, int(np.argmax(v))
            return
        a = 1 - np.exp(-(t - self.t[track]) / self.tau) if self.tau > 0 else 1.0
        self.p[track] = (1 - a) * self.p[track] + a * v
        self.t[track] = t
        top, cur = int(np.argmax(self.p[track])), self.shown_label[track]
        if top != cur and self.p[track][top] - self.p[track][cur] >= self.margin:
            self.shown_label[track] = top

    def shown(self, track):
        return None if track not in self.p else self.labels[self.shown_label[track]]


class Vote:
    """Switch to a new label after ``k`` consecutive answers agree on it."""

    def __init__(self, labels, k: int):
        self.k = k
        self.cur: dict[int, str] = {}
        self.run: dict[int, tuple[str, int]] = {}

    def answer(self, track, probs, t):
        top = max(probs, key=probs.get)
        if track not in self.cur:
            self.cur[track] = top
        label, n = self.run.get(track, (top, 0))
        n = n + 1 if label == top else 1
        self.run[track] = (top, n)
        if n >= self.k:
            self.cur[track] = top

    def shown(self, track):
        return self.cur.get(track)


class Filter:
    """The edge's own filter."""

    def __init__(self, labels, **kw):
        self.book = TrackLabels(labels, **kw)

    def answer(self, track, probs, t):
        self.book.answer(track, probs, t)

    def shown(self, track):
        s = self.book.shown(track)
        return None if s is None else s.label


def replay(events: list[dict], design, relabel_ms: float) -> list[dict]:
    """The events with ``label`` replaced by what ``design`` shows, using answers only as a budget would."""
    last_used: dict[int, float] = defaultdict(lambda: -1e9)
    out = []
    for e in events:
        track, t = e["track"], e["time_s"]
        if e.get("raw_probabilities") and t - last_used[track] >= relabel_ms / 1000 - 1e-6:
            last_used[track] = t
            design.answer(track, e["raw_probabilities"], t)
        out.append(e | {"label": design.shown(track)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, help="bench/edge_quality.py's output folder")
    ap.add_argument("--variant", default="yunet+track", help="the run to replay (every face answered every frame)")
    ap.add_argument("--clips", default="moving,changing")
    ap.add_argument("--relabel-ms", default="0,67,100,133", help="budgets to replay under, ms")
    ap.add_argument("--designs", default="", help="only the designs whose name contains one of these (comma-separated)")
    args = ap.parse_args()

    budgets = [float(b) for b in args.relabel_ms.split(",")]
    rows = []
    for clip in args.clips.split(","):
        truth_path = args.runs / "clips" / f"{clip}.truth.jsonl"
        meta = json.loads((args.runs / "clips" / f"{clip}.json").read_text())
        truth = read_jsonl(truth_path)
        events = read_jsonl(args.runs / "runs" / args.variant / f"{clip}.events.jsonl")
        labels = tuple(next(e for e in events if e.get("raw_probabilities"))["raw_probabilities"])
        designs = {
            "none": lambda: Filter(labels, smoothing=False),
            "ema 300 ms, margin 0.1": lambda: Ema(labels, 300, 0.1),
            "ema 100 ms, margin 0.1": lambda: Ema(labels, 100, 0.1),
            "vote k=2": lambda: Vote(labels, 2),
            "vote k=3": lambda: Vote(labels, 3),
        }
        for memory in (100, 150, 200, 300, 500):
            for weight in (0.4, 0.6, 0.8, 1.0):
                designs[f"filter {memory} ms, w {weight}"] = (
                    lambda m=memory, w=weight: Filter(labels, memory_ms=m, answer_weight=w))
            for margin in (0.1, 0.2, 0.3):
                designs[f"filter {memory} ms, w 1.0, margin {margin}"] = (
                    lambda m=memory, g=margin: Filter(labels, memory_ms=m, answer_weight=1.0, switch_margin=g))
        only = [d for d in args.designs.split(",") if d]
        designs = {k: v for k, v in designs.items() if not only or any(d in k for d in only)}
        for budget in budgets:
            for name, make in designs.items():
                r = score(truth, replay(events, make(), budget), fps=meta["fps"])
                rows.append({"clip": clip, "relabel_ms": budget, "design": name, **r})
                d = r.get("delay_ms") or {}
                print(f"{clip:9} R={budget:4.0f}  {name:26} shown correct {r['shown_correct']:.3f}  "
                      f"changes/face·s {r['changes_per_face_s']:.2f}  "
                      f"delay p50 {d.get('median')} missed {d.get('missed')}", flush=True)
    (args.runs / "smoothing.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
