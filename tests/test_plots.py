"""Charts: real PNGs drawn by matplotlib, and a clear way out when the optional extra is not installed."""

import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from fer_swarm import charts, metrics
from fer_swarm.bench import suite
from fer_swarm.bench.runner import Measured, Point
from fer_swarm.tools.evaluate import plot_confusion

from .conftest import ROOT, error_lines, make_pattern_dataset

CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


@pytest.fixture
def report():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, len(CLASSES), 700)
    predicted = np.where(rng.random(700) < 0.6, truth, rng.integers(0, len(CLASSES), 700))
    return metrics.classification_report(truth, predicted, CLASSES)


@pytest.fixture
def bench_report():
    figures = [("a", "a: in-process, 1 thread", 900, 1.1, 2.0), ("c", suite.c_name(1, 4), 850, 9.0, 14.0),
               ("d", "d: broker alone (echo workers, 4 KB)", 24000, 5.0, 9.0), ("e", "e: simulated Pis, W=1", 250, 60, 80)]
    return suite.Report([Measured(Point(config, name, "swarm"), rate, p50, p50 * 1.3, p99, 0, 0, 0, True)
                         for config, name, rate, p50, p99 in figures])


@pytest.fixture
def no_matplotlib(monkeypatch):
    """As on a Pi installed without the plot extra: importing matplotlib fails."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _is_a_real_chart(path, min_w, min_h):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(path))
    assert img is not None
    h, w = img.shape[:2]
    assert min_w <= w <= 4000 and min_h <= h <= 4000, (w, h)
    return img


def test_confusion_matrix_is_a_heat_map_with_a_colour_bar(report, tmp_path):
    path = plot_confusion(report, tmp_path / "cm.png", title="fer-vgg:1")
    img = _is_a_real_chart(path, 600, 500)
    b, g, r = (img[..., c].astype(int) for c in range(3))
    blue = (b - r > 60) & (b > 120)  # the "Blues" cells and colour bar
    assert blue.mean() > 0.05
    assert (img < 60).all(axis=2).mean() > 0.005  # dark text: counts, class names, axis labels


def test_bench_chart(bench_report, tmp_path):
    json_path, png_path = suite.write(bench_report, tmp_path)
    assert json_path.is_file() and png_path == tmp_path / "bench.png"
    img = _is_a_real_chart(png_path, 900, 500)
    assert (img.max(axis=2) - img.min(axis=2) > 80).mean() > 0.0005  # coloured points, not a blank page


def test_bench_chart_with_no_answered_point_is_still_drawn(tmp_path):
    empty = suite.Report([Measured(Point("c", "c: nothing answered", "swarm"), 0.0, None, None, None, 5, 0, 0, False)])
    _is_a_real_chart(suite.plot(empty, tmp_path / "bench.png"), 900, 500)


def test_without_matplotlib_the_error_says_which_extra_to_install(report, tmp_path, no_matplotlib):
    with pytest.raises(charts.ChartsUnavailable, match=r"pip install 'fer-swarm\[plot\]'"):
        plot_confusion(report, tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_bench_without_matplotlib_warns_and_writes_no_png(bench_report, tmp_path, no_matplotlib, caplog):
    (tmp_path / "bench.png").write_bytes(b"a chart from an older run")
    json_path, png_path = suite.write(bench_report, tmp_path)
    assert json_path.is_file() and png_path is None and not (tmp_path / "bench.png").exists()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "fer-swarm[plot]" in warning.getMessage()


def test_eval_plot_without_matplotlib_fails_at_once_with_one_clear_line(tmp_path, shipped_model):
    """The real CLI in its own process, with the import of matplotlib made to fail as on a bare Pi."""
    data = make_pattern_dataset(tmp_path / "d", classes=("happy", "sad"), per_class=2)
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fer_swarm.cli import run\n"
            f"sys.exit(run(['eval', {str(data)!r}, '--model', {str(shipped_model)!r}, '--plot', "
            f"{str(tmp_path / 'cm.png')!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert res.returncode == 1, res.stderr
    (line,) = error_lines(res.stderr)
    assert "matplotlib" in line and "pip install 'fer-swarm[plot]'" in line
    assert "Traceback" not in res.stderr and res.stdout == ""  # failed before scoring, not after
    assert not (tmp_path / "cm.png").exists()
