#!/usr/bin/env python3
"""Where the CPU goes: CPU time per face of the broker, the worker and the client, by faces per JOB.

Starts a real broker and one real worker (the shipped model, 1 thread) on
loopback and, for each faces-per-JOB count in turn, one load-generating
client process in closed loop. Over a measured span it reads each process's
CPU time from /proc/PID/stat (Linux only) and divides by the faces answered.
Prints one line per count. Usage:

    python bench/cpu_per_face.py [--faces 1,4,8] [--in-flight 8] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from fer_swarm.bench.runner import wait_for_workers
from fer_swarm.launch import free_port, spawn

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def measure(front: str, broker: int, worker: int, faces: int, args) -> dict:
    windows = 2 + args.windows
    cmd = [sys.executable, "-m", "fer_swarm.bench.client", "swarm", front, "--window-s", str(args.window_s),
           "--windows", str(windows), "--start-at", str(time.time() + 2), "--in-flight", str(args.in_flight),
           "--faces-per-job", str(faces), "--stream", f"cpu-{faces}"]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # warm-up windows, not counted
            client.stdout.readline()
        pids = (broker, worker, client.pid)
        before = [cpu_s(p) for p in pids]
        lines = [json.loads(client.stdout.readline()) for _ in range(args.windows)]
        after = [cpu_s(p) for p in pids]
    finally:
        client.wait(30)
    answered = sum(w["results"] for w in lines)
    seconds = sum(w["seconds"] for w in lines)
    per_face = [round((b - a) / answered * 1e6) for a, b in zip(before, after)]
    return {"faces_per_job": faces, "faces_per_s": round(answered / seconds),
            "broker_us": per_face[0], "worker_us": per_face[1], "client_us": per_face[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", default="1,4,8", help="faces per JOB to measure, comma-separated")
    ap.add_argument("--in-flight", type=int, default=8, help="JOBs outstanding")
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--windows", type=int, default=4, help="measured windows per count")
    args = ap.parse_args()
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs = [spawn("broker", "--frontend", front, "--backend", back)]
    try:
        procs.append(spawn("worker", "--broker", back, "--threads", "1"))
        wait_for_workers(front, 1)
        for faces in (int(f) for f in args.faces.split(",")):
            print(json.dumps(measure(front, procs[0].pid, procs[1].pid, faces, args)), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
