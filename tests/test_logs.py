"""Log output: text or JSON lines, -q that hides the model runtime's banner too, on the real CLI and runtime."""

import json
import logging
import sys
import threading
from datetime import datetime, timezone

import pytest

from fer_swarm import logs

from .conftest import error_lines, make_pattern_dataset, run_cli

BANNER = "XNNPACK delegate"


@pytest.fixture
def restore_logging():
    """logs.setup changes process-wide state: put it back for the next test."""
    root, ours = logging.getLogger(), logging.getLogger("fer_swarm")
    saved = (root.handlers[:], root.level, ours.level, sys.excepthook, threading.excepthook)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    ours.setLevel(saved[2])
    sys.excepthook, threading.excepthook = saved[3], saved[4]
    logging.captureWarnings(False)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Two classes named as the shipped model's labels, so eval loads the real model on them."""
    return make_pattern_dataset(tmp_path_factory.mktemp("faces"), classes=("happy", "sad"), per_class=3)


def test_json_lines_carry_time_level_logger_message_exception_and_extras(capsys, restore_logging):
    logs.setup(fmt="json")
    log = logging.getLogger("fer_swarm.test")
    log.info("worker %s joined", "pi-1", extra={"worker": "pi-1", "capacity": 8})
    try:
        raise ValueError("bad crop")
    except ValueError:
        log.exception("job failed")
    log.debug("not shown at the default level")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "fer_swarm.test", "worker pi-1 joined")
    assert (first["worker"], first["capacity"]) == ("pi-1", 8) and "exception" not in first
    ts = datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset().total_seconds() == 0 and abs(ts - datetime.now(timezone.utc)).total_seconds() < 60
    assert second["level"] == "ERROR" and "ValueError: bad crop" in second["exception"]
    assert "Traceback" in second["exception"]


def test_text_lines_and_levels(capsys, restore_logging):
    logs.setup(quiet=True)
    logging.getLogger("fer_swarm.test").info("hidden by -q")
    logging.getLogger("fer_swarm.test").warning("shown by -q")
    (line,) = capsys.readouterr().err.splitlines()  # stderr is not a terminal here: plain, one line per record
    assert line.endswith("WARNING fer_swarm.test: shown by -q") and line[:4].isdigit()
    logs.setup(verbose=1)
    logging.getLogger("fer_swarm.test").debug("ours at -v")
    logging.getLogger("somelib").debug("a library's, only at -vv")
    assert capsys.readouterr().err.count("DEBUG") == 1


def test_native_output_becomes_records_and_keeps_other_lines(capsys, restore_logging, caplog):
    """What C code writes to fd 2 while a runtime loads: its log lines become records, the rest passes through."""
    import os

    caplog.set_level(logging.INFO, logger="tflite")
    with logs.native_output():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"W0000 00:00:1700000000.000000   42 port.cc:153] an absl warning\n")
        os.write(2, b"some other line\n")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tflite"] == [
        ("INFO", "Created TensorFlow Lite XNNPACK delegate for CPU."), ("WARNING", "an absl warning")]
    assert capsys.readouterr().err == "some other line\n"


def test_native_output_keeps_the_runtime_s_reason_when_loading_fails(restore_logging, caplog):
    import os

    caplog.set_level(logging.INFO, logger="tflite")
    before = os.fstat(2)
    with pytest.raises(ValueError), logs.native_output():
        os.write(2, b"ERROR: Didn't find op for builtin opcode 'X'\n")
        raise ValueError("the runtime cannot load this model")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "Didn't find op for builtin opcode 'X'")]
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)  # stderr is stderr again


def test_quiet_eval_hides_the_runtime_banner(faces, shipped_model):
    loud = run_cli("eval", str(faces), "--model", str(shipped_model), timeout=120)
    assert loud.returncode == 0, loud.stderr
    (banner,) = [line for line in loud.stderr.splitlines() if BANNER in line]
    assert " INFO    tflite: " in banner  # the runtime's line, logged as ours are
    quiet = run_cli("-q", "eval", str(faces), "--model", str(shipped_model), timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_json_eval_writes_only_json_on_stderr(faces, shipped_model):
    res = run_cli("--log-format", "json", "eval", str(faces), "--model", str(shipped_model), timeout=120)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stderr.splitlines()]  # every line is one JSON object
    assert any(r["logger"] == "tflite" and BANNER in r["message"] for r in records)


def test_unknown_log_format_is_a_usage_error():
    res = run_cli("--log-format", "xml", "broker", "--help", timeout=60)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1 and "xml" in res.stderr
