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

from .. import charts
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


def planned(opts: BenchOptions) -> int:
    """How many points :func:`run` measures with ``opts`` (for a progress bar; keep in step with run)."""
    if opts.custom is not None:
        return 1
    want, quick = set(opts.configs), opts.quick
    return (("a" in want) * (1 if quick else 2) + ("b" in want)
            + ("c" in want) * (1 if quick else 4 + (opts.faces_per_job != 1))
            + ("d" in want) + ("e" in want) * (len(opts.sim_workers) + 1))


def run(opts: BenchOptions, progress: Callable[[Measured], None] = lambda m: None,
        starting: Callable[[Point], None] = lambda p: None) -> Report:
    """Measure the configurations ``opts`` asks for, one point at a time: ``starting(point)`` before each,
    ``progress(measured)`` after."""
    report = Report()

    def measure(point: Point) -> Measured:
        starting(point)
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


def write(report: Report, out_dir: Path) -> tuple[Path, Path | None]:
    """Write bench.json and, when matplotlib (the ``plot`` extra) is installed, bench.png; the PNG's path
    or None."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "bench.json", out_dir / "bench.png"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    try:
        plot(report, png_path)
    except charts.ChartsUnavailable as e:
        png_path.unlink(missing_ok=True)  # an older run's chart beside these figures would mislead
        log.warning("no %s drawn: %s", png_path.name, e)
        return json_path, None
    return json_path, png_path


COLORS = {"custom": "black", "a": "tab:gray", "b": "tab:red", "c": "tab:blue", "d": "tab:green", "e": "tab:purple"}


def plot(report: Report, path: Path) -> Path:
    """Throughput (x, faces/s, log) against latency (y, ms, log): one dot per point at its p50, a line up to
    its p99, coloured by configuration and numbered, the numbers named beside the chart.

    Needs matplotlib (the ``plot`` extra): raises :class:`fer_swarm.charts.ChartsUnavailable` without it.
    """
    pts = [m for m in report.points if m.p50_ms and m.p99_ms and m.throughput_per_s > 0]
    fig = charts.figure(figsize=(12, 6.5), layout="constrained")
    ax, key = fig.subplots(1, 2, width_ratios=(3, 2))
    line = min(0.045, 0.95 / max(len(pts), 1))
    for i, m in enumerate(pts, 1):
        color = COLORS.get(m.point.config, "black")
        ax.vlines(m.throughput_per_s, m.p50_ms, m.p99_ms, colors=color, linewidth=1.5, alpha=0.6)
        ax.plot(m.throughput_per_s, m.p99_ms, marker="_", markersize=10, color=color)
        ax.plot(m.throughput_per_s, m.p50_ms, marker="o", markersize=7, color=color)
        ax.annotate(str(i), (m.throughput_per_s, m.p50_ms), xytext=(5, -11), textcoords="offset points",
                    fontsize=8, color=color)
        key.text(0, 1 - line * i, f"{i}. {m.point.name}", color=color, fontsize=8.5, va="top",
                 transform=key.transAxes)
    if pts:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no point answered any job", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("throughput (faces/s, log scale)")
    ax.set_ylabel("latency (ms, log scale): dot p50, line up to p99")
    ax.set_title("fer-swarm bench: this machine, one run", fontsize=11)
    key.set_axis_off()
    key.set_title("points (a ceiling, b prototype, c fer-swarm, d broker alone, e simulated Pis)", fontsize=8.5,
                  loc="left")
    return charts.save(fig, path)
