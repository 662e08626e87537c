"""Shared fixtures: real files, real models, real faces. Nothing here fakes the part under test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FER2013 = ROOT.parent / "shared" / "datasets" / "fer2013"
SHIPPED_MODEL = ROOT / "models" / "fer-vgg.tflite"


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``fer-swarm`` entry point in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fer_swarm", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
    )


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
