"""Scoring an edge run against a clip's ground truth: what the person wearing the headset sees.

Inputs are a clip's truth (``NAME.truth.jsonl`` from :mod:`.clips`) and the
edge's ``--events`` file (one JSON line per face per shown frame). Only the
keys ``frame``, ``box`` and ``label`` of an event are read (plus ``raw_label``
and ``error`` for counting what was sent), so events with or without tracks,
landmarks and raw labels score alike.

Matching, per frame: each truth face to at most one event, greedily by
distance between centres, counting a pair only when the event box's centre
lies inside the truth box and the event box's side (its larger dimension) is
0.3x to 2x the truth square's side: a detector frames a face its own way,
but a box on the wrong face, or a whole group of faces, is not a find.

Figures (all per clip):

- ``found``: share of truth face-frames matched by an event (the main one);
  ``faces_found``: share of distinct truth faces (id x image) matched at least once;
- ``accuracy``: among matched face-frames with a label, the share with the true label;
- ``shown_correct``: matched face-frames with the true label / all truth face-frames;
- ``changes_per_face_s``: per id, along its frames, how often its shown label
  (matched, non-null; gaps skipped) differs from the last one shown, summed
  over ids, per truth face-second; ``spurious_per_face_s`` the same for the
  changes no change of truth explains (see :func:`_label_changes`);
- ``delay_ms``: from each change of an id's true label to the first frame, at
  or after it and before the id's next change, where its shown label is the
  new one: median, p90, and ``missed`` changes never followed;
- ``false_boxes_per_frame``: events matched to no truth face;
- ``ceiling``: the model's accuracy on the very same crops, unframed by any
  detector (the source images), weighted per face-frame like ``accuracy``;
  ``delay_ms_model_right``: the delay over only the changes to a face the
  model gets right on its ideal crop, the edge's own lag apart from the
  model's mistakes (a change the model cannot see can never be followed).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["ideal_labels", "match_frame", "print_table", "read_jsonl", "score", "score_files", "sent_faces"]

MIN_SIDE, MAX_SIDE = 0.3, 2.0  # an event box's side, as a multiple of the truth square's, to count as a match


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of a file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def match_frame(truth: Sequence[dict], events: Sequence[dict]) -> dict[int, int]:
    """Truth index -> event index for one frame (see the module docstring for the rule)."""
    pairs = []
    for ti, face in enumerate(truth):
        x, y, w, h = face["box"]
        cx, cy, side = face["square"][:3]
        for ei, event in enumerate(events):
            ex, ey = _centre(event["box"])
            if not (x <= ex <= x + w and y <= ey <= y + h):
                continue
            if not MIN_SIDE * side <= max(event["box"][2], event["box"][3]) <= MAX_SIDE * side:
                continue
            pairs.append((math.hypot(ex - cx, ey - cy), ti, ei))
    matched: dict[int, int] = {}
    taken: set[int] = set()
    for _, ti, ei in sorted(pairs):
        if ti not in matched and ei not in taken:
            matched[ti] = ei
            taken.add(ei)
    return matched


def _label_changes(track: list[tuple[str, str | None]]) -> tuple[int, int]:
    """Label changes along one id's frames, and how many of them no change of truth explains.

    ``track`` is (true label, shown label or None) per frame of the id, in order. A shown change
    is *explained* when the true label has changed since the id's previous shown change and the
    new shown label is the current true one; each change of truth explains at most one shown
    change, so a flicker back and forth after a real change counts as spurious.
    """
    changes = spurious = 0
    last_shown: str | None = None
    truth_changed = False
    previous_truth: str | None = None
    for true_label, shown in track:
        if previous_truth is not None and true_label != previous_truth:
            truth_changed = True
        previous_truth = true_label
        if shown is None:
            continue
        if last_shown is not None and shown != last_shown:
            changes += 1
            if truth_changed and shown == true_label:
                truth_changed = False
            else:
                spurious += 1
        last_shown = shown
    return changes, spurious


def _delays(track: list[tuple[float, str, str | None, str]]) -> list[tuple[str, str, float | None]]:
    """For each change of true label along one id's frames: the new face's image and label, and the
    seconds until the first frame (before the next change) that shows the new label, or None if none does.
    ``track``: (time_s, true label, shown label or None, image) per frame."""
    starts = [i for i in range(1, len(track)) if track[i][1] != track[i - 1][1]]
    out = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(track)
        t0, new, _, image = track[start]
        hit = next((track[i][0] for i in range(start, end) if track[i][2] == new), None)
        out.append((image, new, None if hit is None else hit - t0))
    return out


def _delay_figures(delays: list[float | None]) -> dict[str, Any]:
    followed = [d for d in delays if d is not None]
    pct = (lambda q: round(float(np.percentile(followed, q)) * 1000, 1)) if followed else (lambda q: None)
    return {"median": pct(50), "p90": pct(90), "followed": len(followed), "missed": len(delays) - len(followed)}


def sent_faces(events: Iterable[dict]) -> int:
    """Faces the edge sent for inference in the frames of these events. The edge's own ``sent`` flag
    where it writes one; otherwise (older edges, which sent every face of every frame) a face with
    an answer of its own (``raw_label`` if present, else ``label``) or a reply error, but not one it
    could not send (``UNSENT``)."""
    n = 0
    for e in events:
        if "sent" in e:
            n += bool(e["sent"])
            continue
        own = e["raw_label"] if "raw_label" in e else e.get("label")
        error = e.get("error")
        n += own is not None or (error is not None and not str(error).startswith("UNSENT"))
    return n


def _ratio(a: float, b: float, digits: int = 4) -> float | None:
    return round(a / b, digits) if b else None


def score(truth: Sequence[dict], events: Sequence[dict], *, fps: float, edge_fps: float | None = None,
          ideal: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The figures of one run: ``truth`` as the lines of a truth file, ``events`` as the edge's lines.

    ``ideal`` (from :func:`ideal_labels`: image -> the model's label on that very crop) adds the
    ``ceiling`` and ``delay_ms_model_right``, the delay over the changes to a face the model labels
    right when given its ideal crop: the lag of the edge itself, apart from the model's mistakes.
    Events of frames the truth does not have are not scored; they are counted in ``unscored_events``.
    """
    by_frame: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        by_frame[int(e["frame"])].append(e)
    face_frames = matched_frames = labelled = correct = false_boxes = 0
    seen: set[tuple[int, str]] = set()
    found: set[tuple[int, str]] = set()
    tracks: dict[int, list[tuple[float, str, str | None, str]]] = defaultdict(list)
    ideal_right = ideal_frames = 0
    for line in truth:
        faces, frame_events = line["faces"], by_frame.pop(int(line["frame"]), [])
        matched = match_frame(faces, frame_events)
        false_boxes += len(frame_events) - len(matched)
        for ti, face in enumerate(faces):
            face_frames += 1
            key = (face["id"], face["image"])
            seen.add(key)
            shown = None
            if ti in matched:
                matched_frames += 1
                found.add(key)
                shown = frame_events[matched[ti]].get("label")
                if shown is not None:
                    labelled += 1
                    correct += shown == face["label"]
            tracks[face["id"]].append((float(line["time_s"]), face["label"], shown, face["image"]))
            if ideal is not None and face["image"] in ideal:
                ideal_frames += 1
                ideal_right += ideal[face["image"]] == face["label"]
    changes = spurious = 0
    delays: list[tuple[str, str, float | None]] = []
    for track in tracks.values():
        c, s = _label_changes([(true, shown) for _, true, shown, _ in track])
        changes, spurious = changes + c, spurious + s
        delays += _delays(track)
    face_s = face_frames / fps
    frames = len(truth)
    sent = sent_faces(events)
    model_right = [d for image, label, d in delays if ideal is not None and ideal.get(image) == label]
    return {
        "frames": frames,
        "face_frames": face_frames,
        "found": _ratio(matched_frames, face_frames),
        "faces_found": _ratio(len(found), len(seen)),
        "labelled": _ratio(labelled, matched_frames),
        "accuracy": _ratio(correct, labelled),
        "shown_correct": _ratio(correct, face_frames),
        "changes_per_face_s": _ratio(changes, face_s, 3),
        "spurious_per_face_s": _ratio(spurious, face_s, 3),
        "truth_changes": len(delays),
        "delay_ms": _delay_figures([d for _, _, d in delays]),
        "delay_ms_model_right": _delay_figures(model_right) if ideal is not None else None,
        "false_boxes_per_frame": _ratio(false_boxes, frames, 3),
        "unscored_events": sum(len(v) for v in by_frame.values()),
        "edge_fps": edge_fps,
        "faces_sent": sent,
        "faces_sent_per_s": _ratio(sent, frames / fps, 1),
        "ceiling": _ratio(ideal_right, ideal_frames),
    }


def ideal_labels(truth: Sequence[dict], source: str | Path, model: str | Path | None = None) -> dict[str, str]:
    """The model's label for each face image of a clip, given that very crop: what a perfect detector
    and a perfect crop would show (``model``: default, the shipped one). Unreadable images are left out."""
    import cv2

    from ..datasets import read_gray
    from ..model import DEFAULT_MODEL, Classifier

    clf = Classifier(model or DEFAULT_MODEL)
    labels = {}
    for rel in sorted({face["image"] for line in truth for face in line["faces"]}):
        img = read_gray(Path(source) / rel)
        if img is None:
            continue
        if img.shape[::-1] != clf.crop_size:
            img = cv2.resize(img, clf.crop_size, interpolation=cv2.INTER_AREA)
        labels[rel] = clf.labels[int(np.argmax(clf.predict(np.ascontiguousarray(img))))]
    return labels


def score_files(truth_path: str | Path, events_path: str | Path, *, edge_fps: float | None = None,
                with_ceiling: bool = True) -> dict[str, Any]:
    """:func:`score` on files; the clip's ``NAME.json`` beside its truth gives the fps and the source folder."""
    truth_path = Path(truth_path)
    meta = json.loads(truth_path.with_name(truth_path.name.replace(".truth.jsonl", ".json")).read_text())
    truth = read_jsonl(truth_path)
    ideal = ideal_labels(truth, meta["source"]) if with_ceiling else None
    return score(truth, read_jsonl(events_path), fps=meta["fps"], edge_fps=edge_fps, ideal=ideal)


COLUMNS = (  # (header, key, format; None for a delay's figures): what the table shows of each run
    ("found", "found", "{:.0%}"),
    ("faces ≥1", "faces_found", "{:.0%}"),
    ("acc. found", "accuracy", "{:.2f}"),
    ("shown correct", "shown_correct", "{:.2f}"),
    ("changes /face·s", "changes_per_face_s", "{:.2f}"),
    ("spurious /face·s", "spurious_per_face_s", "{:.2f}"),
    ("delay ms p50/p90 (missed)", "delay_ms", None),
    ("same, model right", "delay_ms_model_right", None),
    ("false /frame", "false_boxes_per_frame", "{:.2f}"),
    ("edge fps", "edge_fps", "{:.1f}"),
    ("faces sent /s", "faces_sent_per_s", "{:.0f}"),
    ("ceiling", "ceiling", "{:.2f}"),
)


def _cell(row: dict, key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt is None:
        if not (value["followed"] or value["missed"]):
            return "-"
        med, p90 = (("-" if value[q] is None else f"{value[q]:.0f}") for q in ("median", "p90"))
        return f"{med}/{p90} ({value['missed']})"
    return fmt.format(value)


def print_table(rows: list[dict], title: str = "edge quality", console=None) -> None:
    """One line per run: each row a :func:`score` dict plus ``variant`` and ``clip`` (and ``error`` if it failed)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("variant")
    table.add_column("clip")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for row in rows:
        if row.get("error"):
            table.add_row(row["variant"], row["clip"], f"[red]failed: {row['error']}", *[""] * (len(COLUMNS) - 1))
            continue
        table.add_row(row["variant"], row["clip"], *(_cell(row, key, fmt) for _, key, fmt in COLUMNS))
    if console is None:  # rich assumes 80 columns when piped, which would fold every cell
        console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Score an edge's --events file against a clip's truth.")
    ap.add_argument("truth", type=Path, help="NAME.truth.jsonl (NAME.json beside it)")
    ap.add_argument("events", type=Path, help="the edge's --events file for that clip")
    ap.add_argument("--edge-fps", type=float, default=None, help="the edge's fps, to show beside the figures")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    result = score_files(args.truth, args.events, edge_fps=args.edge_fps)
    if args.json:
        print(json.dumps(result))
    else:
        print_table([{"variant": args.events.name, "clip": args.truth.name.split(".")[0], **result}])


if __name__ == "__main__":
    main()
