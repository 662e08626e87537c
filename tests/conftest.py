"""Shared fixtures: real files, real models, real faces. Nothing here fakes the part under test."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FER2013 = ROOT.parent / "shared" / "datasets" / "fer2013"
SHIPPED_MODEL = ROOT / "models" / "fer-res.tflite"


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``fer-swarm`` entry point in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fer_swarm", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
    )


def run_on_terminal(*args: str, timeout: float) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal and stdout on a pipe; (exit code, stdout, terminal output)."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TERM="xterm-256color", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "fer_swarm", *args], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    os.close(slave)
    seen, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return proc.returncode, out, seen.decode("utf-8", "replace")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """A real 512x512 public-domain portrait (NASA) shipped inside scikit-image's wheel."""
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)


def make_pattern_dataset(root: Path, classes=("calm", "stripes", "dots"), per_class: int = 12, size: int = 48, seed: int = 0):
    """A tiny learnable folder-per-class set: each class a different pattern, with noise."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(128, 20, (size, size))
            if k == 1:
                img[:, :: 6] += 90
            elif k == 2:
                img[:: 8, :: 8] -= 100
            cv2.imwrite(str(root / cls / f"{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    if not SHIPPED_MODEL.exists():
        pytest.fail(f"the shipped model {SHIPPED_MODEL} is missing")
    return SHIPPED_MODEL
