#!/usr/bin/env python3
"""Faults, floods and slow links: the figures behind issue 13's acceptance points 1 and 2.

Real processes on loopback: a broker (``python -m fer_swarm broker``), workers
with the shipped model, the project's delaying relay
(``python -m fer_swarm.bench.relay``) on worker links, and load clients, each its
own process. Every client keeps each job's fate, so the percentages are of jobs
sent, not of replies that happened to arrive within a window. Parts:

``slow-links``
    Two one-thread workers, each behind its own relay adding 50 ms each way;
    one open-loop client at 60 and 120 two-face JOBs a second, 250 ms deadline,
    ~10 s each: % RESULT, EXPIRED, BUSY, ERROR, unanswered; latency p50/p99 of
    the RESULTs. The workers announce ``--capacity 16`` (the default of 2 per
    thread is also measured, with ``--capacities``), since today's worker does
    not announce a link-sized capacity itself.
``floods``
    1 and 3 clients sending 16-face JOBs as fast as they can and never reading
    a reply, for ~15 s, beside one polite client at 10 two-face JOBs a second
    (250 ms deadline) that reads its replies: the broker's RSS before, its
    peak (VmHWM), after the flooders left, and the polite client's % answered.
    The flooders stand for other machines, so they run at nice 19
    (``--flooder-nice``): on one 2-core host, busy-looping senders at the
    same priority would take the workers' CPU as well as the broker's.
``soak``
    60 s at a moderate open-loop load (two workers, 50 two-face JOBs a second):
    the broker's RSS every second, its growth over the run, and the outcomes.

Prints the figures with the CPU model and the load average (the machine may be
shared), and writes them to ``bench-out/faults.json``. Usage::

    python bench/faults.py                       # all three, about 4 minutes
    python bench/faults.py slow-links --quick    # one part, shorter runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import zmq

from fer_swarm import protocol as p
from fer_swarm.bench.client import crop_of
from fer_swarm.bench.runner import wait_for_workers
from fer_swarm.launch import free_port, spawn
from fer_swarm.config import StatusSettings
from fer_swarm.status import StatusClient

HERE = Path(__file__).resolve()
OWED_WAIT_S = 3.0  # after a client's last send, how long it waits for the replies still owed


# ------------------------------------------------------------------ child processes: load and flood


def run_load(endpoint: str, jobs_per_s: float, faces: int, deadline_ms: int, seconds: float, stream: str) -> dict:
    """Open loop: send ``jobs_per_s`` JOBs a second for ``seconds``, whatever comes back; keep each job's fate."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(endpoint)
    _wait_welcome(sock, stream)
    crop = crop_of(48).tobytes()
    sent_at: dict[int, float] = {}
    outcomes = {"RESULT": 0, "EXPIRED": 0, "BUSY": 0, "ERROR": 0}
    latencies_ms: list[float] = []
    unsent = duplicates = 0
    answered: set[int] = set()
    reasons: Counter = Counter()  # why jobs failed, numbers blanked so that alike reasons add up

    def read(timeout_ms: float) -> None:
        nonlocal duplicates
        if not sock.poll(max(0.0, timeout_ms)):
            return
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            msg = p.decode(sock.recv_multipart(zmq.NOBLOCK))
            ids = msg.ids if isinstance(msg, (p.Expired, p.Busy, p.Error)) else (
                tuple(f.id for f in msg.faces) if isinstance(msg, p.Result) else ())
            if not ids or ids[0].frame not in sent_at:
                continue
            frame = ids[0].frame
            if frame in answered:
                duplicates += 1
                continue
            answered.add(frame)
            outcomes[msg.command.value] += 1
            if not isinstance(msg, p.Result):
                reasons[f"{msg.command.value}: {re.sub(r'[0-9]+', 'N', msg.reason)}"] += 1
            if isinstance(msg, p.Result):
                latencies_ms.append((time.perf_counter() - sent_at[frame]) * 1000)

    interval = 1.0 / jobs_per_s
    start = time.perf_counter()
    next_send, frame = start, 0
    while (now := time.perf_counter()) < start + seconds:
        while next_send <= now:
            frame += 1
            next_send += interval
            ids = tuple(p.CorrelationId(stream=stream, frame=frame, face=i) for i in range(faces))
            job = p.Job(ids=ids, deadline_ms=deadline_ms, width_px=48, height_px=48, payloads=(crop,) * faces)
            try:
                sock.send_multipart(p.encode(job), zmq.NOBLOCK)
                sent_at[frame] = time.perf_counter()
            except zmq.Again:
                unsent += 1
        read((min(next_send, start + seconds) - time.perf_counter()) * 1000)
    end = time.perf_counter() + OWED_WAIT_S
    while len(answered) < len(sent_at) and (left := end - time.perf_counter()) > 0:
        read(left * 1000)
    sock.close(0)
    ctx.term()
    lat = np.array(latencies_ms)
    pct = (lambda q: round(float(np.percentile(lat, q)), 1)) if lat.size else (lambda q: None)
    sent = len(sent_at)
    return {"jobs_per_s": jobs_per_s, "faces_per_job": faces, "deadline_ms": deadline_ms, "seconds": seconds,
            "sent": sent, "unsent": unsent, **{k.lower(): v for k, v in outcomes.items()},
            "unanswered": sent - len(answered), "duplicates": duplicates,
            "result_pct": round(100 * outcomes["RESULT"] / sent, 1) if sent else None,
            "p50_ms": pct(50), "p99_ms": pct(99), "reasons": dict(reasons.most_common(5))}


def run_flood(endpoint: str, faces: int, seconds: float, stream: str) -> dict:
    """Send ``faces``-face JOBs as fast as the socket takes them for ``seconds``; never read a reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    crop = crop_of(48).tobytes()
    sent = refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ids = tuple(p.CorrelationId(stream=stream, frame=sent, face=i) for i in range(faces))
        try:
            sock.send_multipart(p.encode(p.Job(ids=ids, deadline_ms=250, width_px=48, height_px=48,
                                               payloads=(crop,) * faces)), zmq.NOBLOCK)
            sent += 1
        except zmq.Again:  # its own queue is full: the broker stopped reading this connection
            refused += 1
            time.sleep(0.001)
    sock.close(0)
    ctx.term()
    return {"sent": sent, "refused_by_own_queue": refused}


def _wait_welcome(sock: zmq.Socket, stream: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            sock.send_multipart(p.encode(p.Hello(client=stream)), zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.1)
            continue
        if sock.poll(300):
            msg = p.decode(sock.recv_multipart())
            if isinstance(msg, p.Welcome) and msg.model is not None:
                while sock.poll(300):  # the WELCOMEs of earlier HELLOs
                    sock.recv_multipart()
                return
    raise TimeoutError("the broker announced no model in time")


def child(*args: str, nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen(["nice", "-n", str(nice)] * bool(nice) + [sys.executable, str(HERE), *args],
                            stdout=subprocess.PIPE, text=True)


def child_result(proc: subprocess.Popen, timeout_s: float) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args} failed with code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------ the swarm under test


def status_kb(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {name} for {pid}")


class Swarm:
    """A broker, relays and workers as processes, stopped for sure when the ``with`` block ends."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.front_port, self.back_port = free_port(), free_port()
        self.front = f"tcp://127.0.0.1:{self.front_port}"
        self.broker = self._process(spawn("broker", "--frontend", self.front, "--backend",
                                          f"tcp://127.0.0.1:{self.back_port}"))
        self.workers = 0

    def _process(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.stack.callback(_stop, proc)
        return proc

    def relay(self, one_way_ms: float) -> int:
        port = free_port()
        proc = self._process(subprocess.Popen(
            [sys.executable, "-m", "fer_swarm.bench.relay", "--listen", str(port), "--target",
             f"127.0.0.1:{self.back_port}", "--delay-ms", str(one_way_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        proc.stdout.readline()  # its ready line
        return port

    def worker(self, *args: str, one_way_ms: float = 0.0) -> None:
        port = self.relay(one_way_ms) if one_way_ms else self.back_port
        self.workers += 1
        self._process(spawn("worker", "--broker", f"tcp://127.0.0.1:{port}", "--name", f"w{self.workers}", *args))

    def ready(self) -> None:
        wait_for_workers(self.front, self.workers)

    def rss_kb(self) -> int:
        return status_kb(self.broker.pid, "VmRSS")

    def peak_kb(self) -> int:
        return status_kb(self.broker.pid, "VmHWM")

    def status(self) -> dict:
        with StatusClient(StatusSettings(broker=self.front, timeout_s=10)) as c:
            return c.fetch()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _workers_view(status: dict) -> list[dict]:
    keys = ("name", "capacity", "credits", "done", "link_ms", "service_ms")
    return [{k: w[k] for k in keys} for w in status["workers"]]


# ------------------------------------------------------------------ the parts


def slow_links(args) -> list[dict]:
    rows = []
    for capacity in args.capacities:
        for rate in args.rates:
            with ExitStack() as stack:
                swarm = Swarm(stack)
                for _ in range(2):
                    swarm.worker("--threads", "1", "--capacity", str(capacity), one_way_ms=args.one_way_ms)
                swarm.ready()
                # A few seconds of the same load first, so the broker has measured the links.
                child_result(child("_load", swarm.front, "--rate", str(rate), "--seconds", "2", "--stream",
                                   "warm"), 60)
                load = child_result(child("_load", swarm.front, "--rate", str(rate), "--seconds",
                                          str(args.seconds), "--stream", "slow"), args.seconds + 60)
                status = swarm.status()
            row = {"capacity": capacity or "default (8 per thread)", "one_way_ms": args.one_way_ms, **load,
                   "workers": _workers_view(status)}
            rows.append(row)
            print(f"  capacity {row['capacity']!s:>22}, {rate:5.0f} jobs/s: {_outcome_line(load)}"
                  f"  credits {[w['credits'] for w in row['workers']]}", flush=True)
    return rows


def floods(args) -> list[dict]:
    rows = []
    for flooders in args.flooders:
        with ExitStack() as stack:
            swarm = Swarm(stack)
            for _ in range(2):
                swarm.worker("--threads", "1")
            swarm.ready()
            child_result(child("_load", swarm.front, "--rate", "10", "--seconds", "2", "--stream", "warm"), 60)
            before = swarm.rss_kb()
            polite = child("_load", swarm.front, "--rate", "10", "--seconds", str(args.flood_seconds + 2),
                           "--stream", "polite")
            time.sleep(1)
            floods_ = [child("_flood", swarm.front, "--seconds", str(args.flood_seconds), "--stream", f"flood-{i}",
                             nice=args.flooder_nice) for i in range(flooders)]
            samples = []
            while any(f.poll() is None for f in floods_):
                samples.append(swarm.rss_kb())
                time.sleep(0.5)
            flood_results = [child_result(f, 30) for f in floods_]
            polite_result = child_result(polite, 60)
            time.sleep(3)
            after = swarm.rss_kb()
            status = swarm.status()
            row = {"flooders": flooders, "flooder_nice": args.flooder_nice, "flood_seconds": args.flood_seconds,
                   "faces_per_flood_job": 16,
                   "rss_before_mb": round(before / 1024, 1), "rss_peak_mb": round(swarm.peak_kb() / 1024, 1),
                   "rss_after_mb": round(after / 1024, 1), "rss_samples_mb": [round(s / 1024, 1) for s in samples],
                   "flood_jobs_sent": [f["sent"] for f in flood_results], "polite": polite_result,
                   "broker_counters": status["counters"], "clients_known_after": len(status["clients"])}
            rows.append(row)
            print(f"  {flooders} flooder(s) at nice {args.flooder_nice} x {args.flood_seconds:g} s ({sum(row['flood_jobs_sent'])} 16-face jobs "
                  f"sent): broker RSS {row['rss_before_mb']} MB -> peak {row['rss_peak_mb']} MB -> after "
                  f"{row['rss_after_mb']} MB; polite client {_outcome_line(polite_result)}; "
                  f"{polite_result['reasons']}", flush=True)
    return rows


def soak(args) -> dict:
    with ExitStack() as stack:
        swarm = Swarm(stack)
        for _ in range(2):
            swarm.worker("--threads", "1")
        swarm.ready()
        load = child("_load", swarm.front, "--rate", str(args.soak_rate), "--seconds", str(args.soak_seconds),
                     "--stream", "soak")
        samples = []
        t0 = time.monotonic()
        while load.poll() is None and time.monotonic() - t0 < args.soak_seconds + 90:
            samples.append((round(time.monotonic() - t0, 1), swarm.rss_kb()))
            time.sleep(1)
        result = child_result(load, 60)
        status = swarm.status()
    # Growth: a least-squares line through the second half (the first half includes warm-up).
    half = [(t, kb) for t, kb in samples if t >= args.soak_seconds / 2] or samples
    ts, kbs = np.array([t for t, _ in half]), np.array([kb for _, kb in half], dtype=float)
    slope = float(np.polyfit(ts, kbs, 1)[0]) * 60 / 1024 if len(half) >= 2 else None
    row = {"seconds": args.soak_seconds, "jobs_per_s": args.soak_rate, **result,
           "rss_first_mb": round(samples[0][1] / 1024, 1), "rss_mid_mb": round(half[0][1] / 1024, 1),
           "rss_last_mb": round(samples[-1][1] / 1024, 1), "rss_max_mb": round(max(kb for _, kb in samples) / 1024, 1),
           "rss_slope_second_half_mb_per_min": None if slope is None else round(slope, 3),
           "rss_samples": samples, "broker_counters": status["counters"]}
    print(f"  {args.soak_seconds:g} s at {args.soak_rate:g} jobs/s: {_outcome_line(result)}; broker RSS "
          f"{row['rss_first_mb']} MB at start, {row['rss_mid_mb']} at half-time, {row['rss_last_mb']} at the end "
          f"(max {row['rss_max_mb']}; second half {row['rss_slope_second_half_mb_per_min']} MB/min)", flush=True)
    return row


def _outcome_line(r: dict) -> str:
    pct = lambda k: 100 * r[k] / r["sent"] if r["sent"] else 0.0  # noqa: E731
    return (f"{r['sent']} sent: RESULT {pct('result'):.1f}%, EXPIRED {pct('expired'):.1f}%, BUSY {pct('busy'):.1f}%, "
            f"ERROR {pct('error'):.1f}%, unanswered {r['unanswered']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")


def machine() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_load", "_flood"):
        ap = argparse.ArgumentParser()
        ap.add_argument("endpoint")
        ap.add_argument("--rate", type=float, default=10)
        ap.add_argument("--faces", type=int, default=2 if argv[0] == "_load" else 16)
        ap.add_argument("--deadline-ms", type=int, default=250)
        ap.add_argument("--seconds", type=float, default=10)
        ap.add_argument("--stream", default="bench")
        a = ap.parse_args(argv[1:])
        out = (run_load(a.endpoint, a.rate, a.faces, a.deadline_ms, a.seconds, a.stream) if argv[0] == "_load"
               else run_flood(a.endpoint, a.faces, a.seconds, a.stream))
        print(json.dumps(out), flush=True)
        return 0
    ap = argparse.ArgumentParser(prog="python bench/faults.py", description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", metavar="PART", help="slow-links, floods, soak (default: all three)")
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test of this script, not figures)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for faults.json")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[60.0, 120.0],
                    help="slow links: two-face JOBs a second, comma-separated")
    ap.add_argument("--capacities", type=lambda s: [int(x) for x in s.split(",")], default=[16, 0],
                    help="slow links: capacity each worker announces (0: the worker's default)")
    ap.add_argument("--one-way-ms", type=float, default=50.0, help="slow links: delay added each way")
    ap.add_argument("--seconds", type=float, default=10.0, help="slow links: seconds of load per point")
    ap.add_argument("--flooders", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3])
    ap.add_argument("--flood-seconds", type=float, default=15.0)
    ap.add_argument("--flooder-nice", type=int, default=19,
                    help="floods: the flooders' nice value; flooders stand for other machines, so by default they "
                         "get only the CPU the broker and the workers leave (0: compete with them)")
    ap.add_argument("--soak-seconds", type=float, default=60.0)
    ap.add_argument("--soak-rate", type=float, default=50.0, help="soak: two-face JOBs a second")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.flood_seconds, args.soak_seconds = 3.0, 4.0, 10.0
    parts = args.parts or ["slow-links", "floods", "soak"]
    if unknown := set(parts) - {"slow-links", "floods", "soak"}:
        ap.error(f"unknown part(s) {sorted(unknown)}: choose from slow-links, floods, soak")
    host = machine()
    print(f"CPU: {host['cpu']} ({host['cores']} cores), load average {host['loadavg']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "faults.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    for part, fn in (("slow-links", slow_links), ("floods", floods), ("soak", soak)):
        if part in parts:
            print(f"{part}:", flush=True)
            figures = fn(args)
            report[part] = {"machine": {**host, "loadavg_end": list(os.getloadavg())}, "quick": args.quick,
                            "figures": figures}
            path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
