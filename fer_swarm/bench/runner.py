"""``fer-swarm bench``: measure configurations side by side, in one run, on real processes over loopback.

A *point* is one configuration under one load. Its processes (broker,
workers, delaying relays, prototype server, load clients) are started fresh,
the clients report one line per window, and the point ends as soon as three
consecutive windows (after the first, a warm-up) agree within 10% on
throughput, or after ``max_windows`` (then it is reported as not settled).
Figures are taken over the three agreeing windows.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import numpy as np
import zmq

from ..launch import free_port, spawn

log = logging.getLogger(__name__)

AGREE = 0.10  # windows within 10% of their mean count as settled


@dataclass(frozen=True)
class Point:
    config: str  # "a", "b", ... as in docs/performance.md
    name: str  # what the table shows
    kind: str  # "swarm", "inprocess" or "prototype"
    workers: int = 1
    threads: int = 1
    capacity: int = 0
    echo: bool = False  # no model: answered at once, or after service_ms (a simulated device)
    service_ms: float = 0.0
    rtt_ms: float = 0.0
    clients: int = 1
    in_flight: int = 8  # JOBs outstanding per point (closed loop)
    faces_per_job: int = 1  # crops per JOB, as an edge sends a frame's faces together
    rate: float = 0.0
    crop_px: int = 48


@dataclass
class Measured:
    point: Point
    throughput_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    expired: int
    busy: int
    errors: int
    settled: bool
    window_throughputs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self.point), **{k: v for k, v in asdict(self).items() if k != "point"}}


def settled_at(throughputs: list[float], n: int = 3) -> int | None:
    """Index of the first run of ``n`` windows (skipping window 0) within AGREE of their mean."""
    for i in range(1, len(throughputs) - n + 1):
        run = throughputs[i:i + n]
        mean = sum(run) / n
        if mean > 0 and all(abs(t - mean) <= AGREE * mean for t in run):
            return i
    return None


class _Windows:
    """Per-window sums over all clients of a point."""

    def __init__(self, clients: int):
        self.clients = clients
        self.rows: dict[int, list[dict]] = {}

    def add(self, row: dict) -> None:
        self.rows.setdefault(row["i"], []).append(row)

    def complete(self) -> list[list[dict]]:
        out = []
        for i in range(len(self.rows)):
            rows = self.rows.get(i, [])
            if len(rows) < self.clients:
                break
            out.append(rows)
        return out

    @staticmethod
    def throughput(rows: list[dict]) -> float:
        return sum(r["results"] for r in rows) / rows[0]["seconds"]


def _measure(point: Point, client_cmds: list[list[str]], max_windows: int) -> Measured:
    """Run the clients, stop them once settled, and reduce their windows to figures."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in client_cmds]
    lines: queue.Queue = queue.Queue()
    readers = [threading.Thread(target=lambda pr=pr: [lines.put(json.loads(x)) for x in pr.stdout], daemon=True)
               for pr in procs]
    for r in readers:
        r.start()
    windows = _Windows(len(procs))
    deadline = time.monotonic() + 60 + max_windows * 5
    try:
        while time.monotonic() < deadline:
            try:
                windows.add(lines.get(timeout=0.2))
            except queue.Empty:
                if all(pr.poll() is not None for pr in procs) and lines.empty():
                    break
                continue
            done = windows.complete()
            if settled_at([_Windows.throughput(w) for w in done]) is not None or len(done) >= max_windows:
                break
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.terminate()
        for pr in procs:
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
    done = windows.complete()
    if not done:
        errors = " | ".join(pr.stderr.read()[-500:] for pr in procs if pr.stderr)
        raise RuntimeError(f"point {point.name}: no window completed ({errors})")
    throughputs = [round(_Windows.throughput(w), 1) for w in done]
    start = settled_at(throughputs)
    chosen = done[start:start + 3] if start is not None else done[-3:]
    lat = np.array([x for w in chosen for r in w for x in r["lat"]])
    pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if lat.size else (lambda q: None)
    total = lambda k: sum(r[k] for w in done for r in w)  # noqa: E731
    return Measured(
        point=point,
        throughput_per_s=round(sum(_Windows.throughput(w) for w in chosen) / len(chosen), 1),
        p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99),
        expired=total("expired"), busy=total("busy"), errors=total("errors"),
        settled=start is not None, window_throughputs=throughputs,
    )


def _client_cmd(mode: str, target: str, point: Point, window_s: float, windows: int, start_at: float, n: int,
                in_flight: int) -> list[str]:
    cmd = [sys.executable, "-m", "fer_swarm.bench.client", mode, target, "--window-s", str(window_s),
           "--windows", str(windows), "--start-at", str(start_at), "--crop-px", str(point.crop_px),
           "--stream", f"bench-{n}", "--in-flight", str(in_flight), "--threads", str(point.threads),
           "--faces-per-job", str(point.faces_per_job)]
    if point.rate:
        cmd += ["--rate", str(point.rate / point.clients)]
    return cmd


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:g} s") from None
            time.sleep(0.05)


def wait_for_workers(frontend: str, workers: int) -> None:
    from .load import LoadClient

    ctx = zmq.Context()
    client = LoadClient(ctx, frontend, stream="bench-ready")
    try:
        client.wait_ready(timeout_s=60.0, min_workers=workers)
    finally:
        client.close()
        ctx.term()


def run_point(point: Point, *, window_s: float, max_windows: int) -> Measured:
    with ExitStack() as stack:
        def process(*args: str) -> subprocess.Popen:
            proc = spawn(*args)
            stack.callback(_stop, proc)
            return proc

        def relayed(port: int) -> int:
            """The port clients should use: ``port`` itself, or a delaying relay in front of it."""
            if not point.rtt_ms:
                return port
            from .relay import Relay

            relay = Relay(0, ("127.0.0.1", port), point.rtt_ms / 2000)
            relay.start()
            stack.callback(relay.stop)
            return relay.port

        target = ""
        if point.kind == "swarm":
            front, back = free_port(), free_port()
            process("broker", "--frontend", f"tcp://127.0.0.1:{front}", "--backend", f"tcp://127.0.0.1:{back}",
                    "--max-queue", "20000", "--max-queue-per-client", "10000")
            _wait_for_port(back)  # a relay started before the broker binds would turn workers away once
            worker_back = relayed(back)
            args = ["--threads", str(point.threads), "--capacity", str(point.capacity)]  # 0: the worker's default
            if point.echo:
                args += ["--echo", "--echo-crop-px", str(point.crop_px)]  # announce the crops the clients send
            if point.service_ms:
                args += ["--service-time-ms", str(point.service_ms)]
            for i in range(point.workers):
                process("worker", "--broker", f"tcp://127.0.0.1:{worker_back}", "--name", f"w{i}", *args)
            wait_for_workers(f"tcp://127.0.0.1:{front}", point.workers)
            target = f"tcp://127.0.0.1:{relayed(front)}"
        elif point.kind == "prototype":
            port = free_port()
            cmd = [sys.executable, "-m", "fer_swarm.bench.prototype", "serve", "--port", str(port)]
            if point.service_ms:
                cmd += ["--service-time-ms", str(point.service_ms)]
            server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            stack.callback(_stop, server)
            server.stdout.readline()  # its ready line
            target = f"127.0.0.1:{relayed(port)}"
        start_at = time.time() + 2.5  # client processes import numpy, zmq and the model in that time
        per_client = max(1, math.ceil(point.in_flight / point.clients))
        cmds = [_client_cmd(point.kind, target, point, window_s, max_windows, start_at, n, per_client)
                for n in range(point.clients if point.kind == "swarm" else 1)]
        return _measure(point, cmds, max_windows)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
