#!/usr/bin/env python3
"""The cost of CurveZMQ on throughput and latency, side by side with plaintext in one run.

Starts a real broker and two real workers (the shipped model) on loopback,
first in plaintext, then with CURVE on both links, and drives each with the
same closed-loop client (K jobs in flight). Prints one line per mode and the
ratio. Usage: python bench/curve_cost.py [--in-flight 8] [--window-s 3] [--windows 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import zmq

from fer_swarm import security
from fer_swarm.bench.load import LoadClient
from fer_swarm.launch import swarm


def measure(curve_dir: Path | None, args) -> dict:
    broker_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ("--threads", "1")
    client_curve = None
    if curve_dir:
        broker_args = ("--secret-key", str(curve_dir / "broker.key_secret"), "--client-keys", str(curve_dir / "clients"),
                       "--worker-keys", str(curve_dir / "workers"))
        worker_args += ("--secret-key", str(curve_dir / "worker.key_secret"), "--broker-key", str(curve_dir / "broker.key"))
        client_curve = (security.load_secret(curve_dir / "client.key_secret"), security.load_public(curve_dir / "broker.key"))
    ctx = zmq.Context()
    try:
        with swarm(2, broker_args=broker_args, worker_args=worker_args) as (front, _):
            client = LoadClient(ctx, front, curve=client_curve)
            try:
                client.wait_ready()
                client.closed_loop(args.in_flight, 1.0, 1)  # warm-up, not counted
                result = client.closed_loop(args.in_flight, args.window_s, args.windows).merged()
            finally:
                client.close()
    finally:
        ctx.term()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--window-s", type=float, default=3.0)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in ("broker", "client", "worker"):
            security.generate(name, d)
        (d / "clients").mkdir()
        (d / "workers").mkdir()
        (d / "clients" / "client.key").write_bytes((d / "client.key").read_bytes())
        (d / "workers" / "worker.key").write_bytes((d / "worker.key").read_bytes())
        plain = measure(None, args)
        curve = measure(d, args)
    for name, r in (("plaintext", plain), ("CURVE", curve)):
        print(f"{name:9}  {r['throughput_per_s']:8.1f} faces/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
              f"windows {r['window_throughputs']}")
    ratio = curve["throughput_per_s"] / plain["throughput_per_s"]
    print(f"CURVE/plaintext throughput: {ratio:.3f} (K={args.in_flight} in flight, 2 workers x 1 thread)")
    if args.json:
        args.json.write_text(json.dumps({"plaintext": plain, "curve": curve, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
