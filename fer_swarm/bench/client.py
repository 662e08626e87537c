"""One load-generating process of ``fer-swarm bench``; prints one JSON line per window as it closes.

    python -m fer_swarm.bench.client swarm ENDPOINT --in-flight K | --rate R ...
    python -m fer_swarm.bench.client inprocess --threads T [--rate R] ...
    python -m fer_swarm.bench.client prototype HOST:PORT ...

All modes start their first window at ``--start-at`` (a wall-clock time the
runner gives every client), so windows from several processes line up and
can be added together.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

WINDOW_FIELDS = ("results", "expired", "busy", "errors")


def emit(index: int, window) -> None:
    line = {"i": index, "seconds": window.seconds, **{k: getattr(window, k) for k in WINDOW_FIELDS},
            "lat": [round(x, 3) for x in window.latencies_ms]}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def crop_of(size: int) -> np.ndarray:
    """A real face crop at size x size (4 KB at 64 px): scikit-image's bundled LFW faces."""
    import cv2
    from skimage import data

    face = (data.lfw_subset()[0] * 255).astype(np.uint8)
    return cv2.resize(face, (size, size), interpolation=cv2.INTER_CUBIC)


def wait_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def run_swarm(args) -> None:
    import zmq

    from .load import LoadClient

    ctx = zmq.Context()
    client = LoadClient(ctx, args.target, stream=args.stream, crop=crop_of(args.crop_px), deadline_ms=args.deadline_ms,
                        faces_per_job=args.faces_per_job)
    client.wait_ready()
    wait_until(args.start_at)
    counter = iter(range(10**9))
    on_window = lambda w: emit(next(counter), w)  # noqa: E731
    if args.rate:
        client.open_loop(args.rate, args.window_s, args.windows, on_window)
    else:
        client.closed_loop(args.in_flight, args.window_s, args.windows, on_window)
    client.close()
    ctx.term()


def run_inprocess(args) -> None:
    """The ceiling: the same model on ``threads`` threads in this process, no network at all."""
    from ..model import Classifier
    from .load import Window

    crop = crop_of(args.crop_px)
    classifiers = [Classifier(threads=1) for _ in range(args.threads)]
    for clf in classifiers:
        clf.predict(crop)
    lock = threading.Lock()
    windows = [Window(args.window_s) for _ in range(args.windows)]
    wait_until(args.start_at)
    t0 = time.perf_counter()
    end = t0 + args.window_s * args.windows
    interval = args.threads / args.rate if args.rate else 0.0

    def loop(clf: Classifier, offset: float) -> None:
        next_at = t0 + offset
        while True:
            if interval:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                start = next_at
            else:
                start = time.perf_counter()
            if start >= end:
                return
            clf.predict(crop)
            done = time.perf_counter()
            k = int((done - t0) / args.window_s)
            if k < len(windows):
                with lock:
                    windows[k].results += 1
                    windows[k].latencies_ms.append((done - start) * 1000)

    threads = [threading.Thread(target=loop, args=(clf, i * interval / args.threads if interval else 0.0))
               for i, clf in enumerate(classifiers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, w in enumerate(windows):
        emit(i, w)


def run_prototype(args) -> None:
    from .prototype import run_prototype_client

    host, port = args.target.rsplit(":", 1)
    wait_until(args.start_at)
    result = run_prototype_client(host, int(port), crop_of(args.crop_px), window_s=args.window_s, windows=args.windows)
    for i, w in enumerate(result.windows):
        emit(i, w)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fer_swarm.bench.client", description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("swarm", "inprocess", "prototype"))
    ap.add_argument("target", nargs="?", default="", help="broker frontend endpoint, or HOST:PORT of a prototype server")
    ap.add_argument("--in-flight", type=int, default=8, help="closed loop: JOBs outstanding")
    ap.add_argument("--faces-per-job", type=int, default=1, help="crops in each JOB (swarm mode)")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop at this many faces/s (0: closed loop)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--start-at", type=float, default=0.0)
    ap.add_argument("--crop-px", type=int, default=48)
    ap.add_argument("--deadline-ms", type=int, default=5000)
    ap.add_argument("--stream", default="bench")
    args = ap.parse_args(argv)
    {"swarm": run_swarm, "inprocess": run_inprocess, "prototype": run_prototype}[args.mode](args)


if __name__ == "__main__":
    main()
