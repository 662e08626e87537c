"""The configurations ``fer-swarm bench`` compares, the targets it checks, and its JSON and PNG output.

    a  in-process inference, same threads: the ceiling
    b  the prototype's design: one TCP connection, one face at a time, send then wait
    c  fer-swarm with 1 and 2 workers (closed loop), a frame's faces per JOB as the edge sends them, and
       1 face per JOB; then both a and c at half of c's capacity (open loop)
    d  the broker alone: echo workers that run no model, 4 KB crops
    e  simulated Raspberry Pis (fixed service time, 4 threads each) behind a delaying relay on every
       link, W = 1, 2, 4, 8, against the prototype design under the same delay
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .runner import Measured, Point, run_point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    out_dir: Path = Path("bench-out")
    window_s: float = 1.0
    max_windows: int = 8
    service_ms: float = 15.0
    rtt_ms: float = 5.0
    pi_threads: int = 4
    sim_workers: tuple[int, ...] = (1, 2, 4, 8)
    configs: str = "abcde"
    faces_per_job: int = 4  # config c: crops per JOB, as the edge sends a frame of four faces
    custom: Point | None = None  # measure this one point instead of the configurations
    quick: bool = False

    @classmethod
    def smoke(cls, out_dir: Path) -> BenchOptions:
        """Seconds, not minutes: one point per configuration, short windows (CI checks it runs)."""
        return cls(out_dir=out_dir, window_s=0.3, max_windows=4, sim_workers=(1,), quick=True)


@dataclass
class Report:
    points: list[Measured] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)

    def by_name(self, name: str) -> Measured | None:
        return next((m for m in self.points if m.point.name == name), None)

    def to_dict(self) -> dict:
        return {"points": [m.to_dict() for m in self.points], "targets": self.targets}


def run(opts: BenchOptions, progress: Callable[[Measured], None] = lambda m: None) -> Report:
    report = Report()

    def measure(point: Point) -> Measured:
        m = run_point(point, window_s=opts.window_s, max_windows=opts.max_windows)
        report.points.append(m)
        progress(m)
        return m

    if opts.custom is not None:
        measure(opts.custom)
        return report
    want = set(opts.configs)
    if "a" in want:
        measure(Point("a", "a: in-process, 1 thread", "inprocess", threads=1))
        if not opts.quick:
            measure(Point("a", "a: in-process, 2 threads", "inprocess", threads=2))
    if "b" in want:
        measure(Point("b", "b: prototype design", "prototype"))
    if "c" in want:
        f = opts.faces_per_job
        c1 = measure(Point("c", c_name(1, f), "swarm", workers=1, in_flight=8, faces_per_job=f))
        if not opts.quick:
            measure(Point("c", c_name(2, f), "swarm", workers=2, in_flight=16, faces_per_job=f))
            if f != 1:
                measure(Point("c", c_name(1, 1), "swarm", workers=1, in_flight=8))
            half = round(c1.throughput_per_s / 2)
            measure(Point("a", f"a: in-process, 1 thread, {half}/s", "inprocess", threads=1, rate=half))
            measure(Point("c", f"{c_name(1, f)}, {half}/s", "swarm", workers=1, in_flight=8, rate=half,
                          faces_per_job=f))
    if "d" in want:
        measure(Point("d", "d: broker alone (echo workers, 4 KB)", "swarm", workers=2, echo=True, capacity=64,
                      clients=2, in_flight=128, crop_px=64))
    if "e" in want:
        for w in opts.sim_workers:
            cap = 2 * opts.pi_threads  # two jobs per thread: one runs while the next crosses the link
            # A simulated Pi sleeps its service time; its inference would run on the Pi, not on this CPU.
            measure(Point("e", f"e: simulated Pis, W={w}", "swarm", workers=w, threads=opts.pi_threads, capacity=cap,
                          echo=True, service_ms=opts.service_ms, rtt_ms=opts.rtt_ms, clients=2,
                          in_flight=int(w * cap * 1.5)))
        measure(Point("e", "e: prototype design, simulated Pi", "prototype", service_ms=opts.service_ms,
                      rtt_ms=opts.rtt_ms))
    report.targets = targets(report, opts)
    return report


def c_name(workers: int, faces_per_job: int) -> str:
    return f"c: fer-swarm, {workers} worker{'s' * (workers > 1)}, {faces_per_job} face{'s' * (faces_per_job > 1)}/JOB"


def targets(report: Report, opts: BenchOptions) -> list[dict]:
    """The issue's targets as measured ratios (figures from this one run only)."""
    out = []

    def check(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": ok})

    a1, c1 = report.by_name("a: in-process, 1 thread"), report.by_name(c_name(1, opts.faces_per_job))
    if a1 and c1:
        r = c1.throughput_per_s / a1.throughput_per_s
        check(f"fer-swarm 1 worker ({opts.faces_per_job} faces/JOB) / in-process 1 thread, throughput",
              round(r, 3), ">= 0.80", r >= 0.8)
    d = report.by_name("d: broker alone (echo workers, 4 KB)")
    if d:
        check("broker alone, jobs/s", d.throughput_per_s, ">= 10000", d.throughput_per_s >= 10_000)
    for w in opts.sim_workers:
        e = report.by_name(f"e: simulated Pis, W={w}")
        if e:
            ideal = w * opts.pi_threads * 1000 / opts.service_ms
            check(f"simulated Pis W={w}, share of W x {opts.pi_threads} x 1000/{opts.service_ms:g}",
                  round(e.throughput_per_s / ideal, 3), ">= 0.90", e.throughput_per_s >= 0.9 * ideal)
    proto = report.by_name("e: prototype design, simulated Pi")
    if proto:
        ideal = 1000 / (opts.service_ms + opts.rtt_ms)
        check("prototype design with simulated Pi, faces/s", proto.throughput_per_s, f"near {ideal:.0f}", None)
    half_a = next((m for m in report.points if m.point.config == "a" and m.point.rate), None)
    half_c = next((m for m in report.points if m.point.config == "c" and m.point.rate), None)
    if half_a and half_c and half_a.p99_ms is not None and half_c.p99_ms is not None:
        extra = half_c.p99_ms - half_a.p99_ms
        check("p99 added by the swarm at half capacity, ms", round(extra, 2), "<= 5", extra <= 5)
    return out


def write(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "bench.json", out_dir / "bench.png"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot(report, png_path)
    return json_path, png_path


COLORS = {"custom": (0, 0, 0), "a": (60, 60, 60), "b": (40, 40, 200), "c": (200, 120, 30), "d": (40, 160, 40), "e": (160, 40, 160)}


def plot(report: Report, path: Path) -> None:
    """Throughput (x, log) against p99 latency (y, log), one dot per point, coloured by configuration."""
    pts = [m for m in report.points if m.p99_ms and m.throughput_per_s > 0]
    w, h, left, bottom, top, legend = 1100, 640, 80, 60, 30, 400
    img = np.full((h, w, 3), 255, np.uint8)
    if not pts:
        cv2.imwrite(str(path), img)
        return
    xs = np.log10([m.throughput_per_s for m in pts])
    ys = np.log10([m.p99_ms for m in pts])
    x0, x1 = np.floor(xs.min()), np.ceil(xs.max() + 0.01)
    y0, y1 = np.floor(ys.min()), np.ceil(ys.max() + 0.01)
    px = lambda v: int(left + (v - x0) / (x1 - x0) * (w - left - legend))  # noqa: E731
    py = lambda v: int(h - bottom - (v - y0) / (y1 - y0) * (h - bottom - top))  # noqa: E731
    font = cv2.FONT_HERSHEY_SIMPLEX
    for e in range(int(x0), int(x1) + 1):
        cv2.line(img, (px(e), top), (px(e), h - bottom), (225, 225, 225), 1)
        cv2.putText(img, f"{10 ** e:g}", (px(e) - 12, h - bottom + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for e in range(int(y0), int(y1) + 1):
        cv2.line(img, (left, py(e)), (w - legend, py(e)), (225, 225, 225), 1)
        cv2.putText(img, f"{10 ** e:g} ms", (5, py(e) + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "throughput, faces/s (log) ->", (left + 200, h - 15), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "p99 latency (log)", (5, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (m, x, y) in enumerate(zip(pts, xs, ys)):
        color = COLORS.get(m.point.config, (0, 0, 0))
        cv2.circle(img, (px(x), py(y)), 6, color, -1, cv2.LINE_AA)
        cv2.putText(img, str(i + 1), (px(x) + 7, py(y) - 5), font, 0.45, color, 1, cv2.LINE_AA)
        cv2.putText(img, f"{i + 1}. {m.point.name}"[:52], (w - legend + 10, top + 18 * i + 10), font, 0.42, color, 1,
                    cv2.LINE_AA)
    cv2.imwrite(str(path), img)
