"""Progress bars on eval and bench: drawn when stderr is a terminal (a real pseudo-terminal here), silent when
it is a pipe, a file or a service's log."""

import pytest

from .conftest import make_pattern_dataset, run_cli, run_on_terminal

BAR = "━"  # rich's bar (tables on stdout draw it too); its spinners are braille dots
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
BENCH_POINT = ("bench", "--workers", "1", "--window-s", "0.3", "--max-windows", "4")


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
