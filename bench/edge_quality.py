#!/usr/bin/env python3
"""What the wearer sees, measured: the real edge on clips with ground truth, variant by variant (issue 10).

Makes the clips (cached under OUT/clips, remade only when the maker, seed or
source change), starts a real broker and two one-thread workers on loopback,
runs the real ``fer-swarm edge --video CLIP --events EVENTS`` once per
(variant, clip), headless and on every frame (a file is not read in real
time), scores every run against the clip's truth, prints one table and writes
OUT/quality.json. A variant is a name and the extra edge flags it runs with.

    python bench/edge_quality.py [--variants today] [--clips still,moving,changing] [--seed 0]
        [--source ../shared/datasets/fer2013/val] [--out bench-out/quality] [--realtime] [--model fer-vgg]

Edge fps comes from the edge's own summary (frames shown over its loop's
wall time, start-up not counted). Off real time (the default) the edge
waits for a frame's answers before reading further once it holds
``max_pending_frames`` frames, so that figure is the whole chain's pace,
workers included, not the edge's alone; ``--realtime`` reads the clip as a
camera delivers frames, so fps is what the wearer gets (a frame the edge
drops has no events and scores as faces not found). Faces sent per second
are counted from the events (see ``quality.sent_faces``) over the clip's
length: the work one headset gives the pool.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fer_swarm.bench.clips import KINDS, make_clips
from fer_swarm.bench.quality import ideal_labels, print_table, read_jsonl, score
from fer_swarm.launch import swarm
from fer_swarm.model import DEFAULT_MODEL, resolve_model

ROOT = Path(__file__).resolve().parent.parent
# The last commit before issue 10's edge work: Haar, a label per frame, every face sent every frame.
BEFORE_ISSUE_10 = "8da6360"


@dataclass(frozen=True)
class Variant:
    """Extra ``fer-swarm edge`` flags, and the code to run: a git revision (broker, workers and edge
    all from it, so their wire formats agree) or None for the working tree."""

    flags: tuple[str, ...] = ()
    rev: str | None = None


_NO_EXTRAS = ("--no-smoothing", "--relabel-ms", "0")
VARIANTS: dict[str, Variant] = {
    "today": Variant(rev=BEFORE_ISSUE_10),
    "haar": Variant(("--detector", "haar", "--no-tracking", *_NO_EXTRAS)),
    "yunet": Variant(("--detector", "yunet", "--no-tracking", *_NO_EXTRAS)),
    "yunet+track": Variant(("--detector", "yunet", *_NO_EXTRAS)),
    "yunet+track+smooth": Variant(("--detector", "yunet", "--relabel-ms", "0")),
    "haar+track+smooth": Variant(("--detector", "haar", "--relabel-ms", "0")),
    "default": Variant(),  # whatever the edge does with no flags at all
    "default relabel-200ms": Variant(("--relabel-ms", "200")),
    "default yunet-320px": Variant(("--detect-width-px", "320")),
}
_FPS = re.compile(r"(\d+) in ([\d.]+) s \(([\d.]+) fps\)")


def code_at(rev: str, cache: Path) -> Path:
    """The files of git revision ``rev`` of this repository, exported once into ``cache``."""
    full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = cache / full[:12]
    if not (out / "fer_swarm" / "__init__.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", full], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(out)
    return out


@contextmanager
def code(rev: str | None, cache: Path):
    """Run the child processes started inside this block on ``rev``'s code (None: the working tree).

    ``python -m fer_swarm`` puts its working folder first on the path, and launch.spawn starts
    children in ours, so both the folder and PYTHONPATH point at the exported code meanwhile.
    """
    if rev is None:
        yield ROOT
        return
    where = code_at(rev, cache)
    old_cwd, old_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(where)
    os.environ["PYTHONPATH"] = str(where)
    try:
        yield where
    finally:
        os.chdir(old_cwd)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def wait_for_workers(front: str, workers: int) -> None:
    """The bench's own wait, run in a child so that it speaks the protocol of the code under test."""
    subprocess.run([sys.executable, "-c", "import sys; from fer_swarm.bench.runner import wait_for_workers; "
                    "wait_for_workers(sys.argv[1], int(sys.argv[2]))", front, str(workers)],
                   check=True, timeout=90)


def run_edge(front: str, clip: Path, events: Path, extra: list[str], stream: str, timeout_s: float) -> dict:
    """One edge process on one clip; returns the frames it showed, its fps and wall time, or an error line."""
    cmd = [sys.executable, "-m", "fer_swarm", "-q", "edge", "--broker", front, "--video", str(clip),
           "--events", str(events), "--stream", stream, "--connect-timeout-s", "60", *extra]
    started = time.monotonic()
    try:
        # A wide terminal, so rich does not wrap the summary line the fps is read from.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return {"error": f"edge still running after {timeout_s:.0f} s"}
    wall = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[:200], "wall_s": wall}
    m = _FPS.search(done.stdout)
    return {"edge_frames": int(m.group(1)) if m else None, "edge_fps": float(m.group(3)) if m else None,
            "process_wall_s": wall}


def run_variants(front: str, variants: list[str], clips: dict, truths: dict, metas: dict, ideals: dict,
                 out: Path, realtime: bool) -> list[dict]:
    """Each variant on each clip, one edge process at a time, against the swarm at ``front``; one row per run."""
    rows = []
    for variant in variants:
        flags = [*VARIANTS[variant].flags, "--realtime" if realtime else "--no-realtime"]
        run_dir = out / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", variant)
        run_dir.mkdir(parents=True, exist_ok=True)
        for kind, clip in clips.items():
            events = run_dir / f"{kind}.events.jsonl"
            events.unlink(missing_ok=True)
            seconds = metas[kind]["frames"] / metas[kind]["fps"]
            stream = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"quality-{variant}-{kind}")[:64]
            ran = run_edge(front, clip.video, events, flags, stream, timeout_s=90 + 10 * seconds)
            row = {"variant": variant, "clip": kind, "flags": flags, "rev": VARIANTS[variant].rev, **ran}
            if "error" not in ran:
                row.update(score(truths[kind], read_jsonl(events), fps=metas[kind]["fps"],
                                 edge_fps=ran["edge_fps"], ideal=ideals[kind]))
            rows.append(row)
            print(f"{variant} on {kind}: " + (f"failed: {row['error']}" if "error" in row else
                  f"found {row['found']:.0%}, shown correct {row['shown_correct']:.2f}, "
                  f"{row['edge_fps']} fps, {row['process_wall_s']} s"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="today", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--clips", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "datasets" / "fer2013" / "val",
                    help="folder-per-class faces the clips are made from (never test data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "quality")
    ap.add_argument("--workers", type=int, default=2, help="one-thread worker processes")
    ap.add_argument("--model", default=None,
                    help="the workers' model, a path or a shipped model's name (default: fer-res)")
    ap.add_argument("--realtime", action="store_true",
                    help="read the clips at their own frame rate, as a camera would be (the edge drops frames "
                         "when behind, and a dropped frame scores as faces not found); default: every frame")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    kinds = [k.strip() for k in args.clips.split(",") if k.strip()]
    unknown = [v for v in variants if v not in VARIANTS] + [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown variant or clip: {', '.join(unknown)}")
    out, source = args.out.resolve(), args.source.resolve()  # children may run in another folder

    started, load_before = time.monotonic(), os.getloadavg()
    clips = make_clips(out / "clips", source, kinds, seed=args.seed)
    print(f"clips ready in {time.monotonic() - started:.0f} s: {', '.join(str(c.video) for c in clips.values())}",
          flush=True)
    truths = {k: read_jsonl(c.truth) for k, c in clips.items()}
    metas = {k: json.loads(c.meta.read_text()) for k, c in clips.items()}
    model = resolve_model(args.model or DEFAULT_MODEL).resolve()  # absolute: the children may run elsewhere
    ideals = {k: ideal_labels(truths[k], metas[k]["source"], model) for k in kinds}  # the workers' model

    rows = []
    for rev in dict.fromkeys(VARIANTS[v].rev for v in variants):  # one swarm per code revision, in order
        with code(rev, out / "code"), swarm(args.workers, worker_args=("--threads", "1", "--model", str(model))) as (front, _):
            wait_for_workers(front, args.workers)
            rows += run_variants(front, [v for v in variants if VARIANTS[v].rev == rev], clips, truths, metas,
                                 ideals, out, args.realtime)
    took = round(time.monotonic() - started, 1)
    print_table(rows, title=f"edge quality: broker + {args.workers} one-thread workers on {model.stem}, seed {args.seed}, "
                f"{'real time' if args.realtime else 'every frame'} ({took} s)")
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed, "source": str(source),
              "model": str(model),
              "realtime": args.realtime,
              "workers": args.workers, "threads_per_worker": 1, "seconds": took, "cpus": os.cpu_count(),
              # Other work on the machine slows the edge: fps figures are only comparable at similar load.
              "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "clips": metas, "runs": rows}
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures: {out / 'quality.json'}")


if __name__ == "__main__":
    main()
