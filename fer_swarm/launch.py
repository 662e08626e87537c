"""Real fer-swarm processes on loopback, for the demo and the benchmarks: started with the CLI, stopped for sure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fer_swarm", "-q", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@contextmanager
def swarm(workers: int = 1, *, broker_args: tuple[str, ...] = (), worker_args: tuple[str, ...] = ()):
    """A broker and ``workers`` worker processes on fresh loopback ports; yields (frontend, backend)."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    procs = [spawn("broker", "--frontend", front, "--backend", back, *broker_args)]
    try:
        procs += [spawn("worker", "--broker", back, "--name", f"bench-{i}", *worker_args) for i in range(workers)]
        yield front, back
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
