"""Progress bars on eval and bench: drawn when stderr is a terminal (a real pseudo-terminal here), silent when
it is a pipe, a file or a service's log."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, make_pattern_dataset, run_cli

BAR = "━"  # rich's bar (tables on stdout draw it too); its spinners are braille dots
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
BENCH_POINT = ("bench", "--workers", "1", "--window-s", "0.3", "--max-windows", "4")


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


def drew_progress(text: str) -> bool:
    return BAR in text or bool(SPINNER & set(text))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return make_pattern_dataset(tmp_path_factory.mktemp("faces"), classes=("happy", "sad"), per_class=20)


def test_eval_shows_progress_on_a_terminal_only(faces, shipped_model):
    code, out, terminal = run_on_terminal("-q", "eval", str(faces), "--model", str(shipped_model), timeout=120)
    assert code == 0, terminal
    assert "scoring faces" in terminal and drew_progress(terminal), terminal
    assert "accuracy" in out  # the report, on stdout as always
    piped = run_cli("-q", "eval", str(faces), "--model", str(shipped_model), timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # no bar, no spinner, no banner: nothing at all


def test_bench_shows_progress_on_a_terminal_only(tmp_path):
    code, out, terminal = run_on_terminal("-q", *BENCH_POINT, "--out", str(tmp_path / "tty"), timeout=180)
    assert code == 0, terminal
    assert "custom: 1W x 1T" in terminal and drew_progress(terminal), terminal
    piped = run_cli("-q", *BENCH_POINT, "--out", str(tmp_path / "pipe"), timeout=180)
    assert piped.returncode == 0, piped.stderr
    assert "custom: 1W x 1T" in piped.stderr  # each point's figures, as plain lines
    assert not drew_progress(piped.stderr), piped.stderr
    assert all(line.strip() for line in piped.stderr.splitlines()), piped.stderr  # not even a bar's blank line
