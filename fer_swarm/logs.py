"""Log output of every ``fer-swarm`` command: human-readable text or one JSON object per line.

``setup`` is called once, by the CLI's main callback, before any command runs:

- ``text`` (the default): time, level, logger and message. On a terminal
  through rich's handler (colours, and lines that stay above a progress bar);
  elsewhere (a pipe, a file, journald) one plain line per record, never
  wrapped, so ``grep`` and the journal see whole records.
- ``json``: one JSON object per line with ``ts`` (ISO-8601, UTC), ``level``,
  ``logger``, ``message``, ``exception`` when there is one, and every field
  given with ``extra=``, for services and log shippers.

``-q`` shows warnings and errors only, the model runtime's included: LiteRT
prints its banner ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
from C++ with ``fprintf(stderr)``, below anything an environment variable or
a Python call controls, so :func:`native_output` catches what the runtime
writes while it loads a model and logs it as records of logger ``tflite``.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class LogFormat(str, enum.Enum):
    text = "text"
    json = "json"


# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, exception (if any), and the ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry.setdefault(key, value)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup(*, verbose: int = 0, quiet: bool = False, fmt: LogFormat | str = LogFormat.text, console=None) -> None:
    """Send every log record to stderr in ``fmt``, replacing any handler set before.

    Levels: ``quiet`` shows warnings and errors only; ``verbose`` 1 shows
    fer-swarm's DEBUG records, 2 the libraries' too; otherwise INFO.
    ``console`` is the rich console on stderr that progress bars also use.
    """
    fmt = LogFormat(fmt)
    level = logging.WARNING if quiet else logging.INFO
    if fmt is LogFormat.json:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif _is_terminal(console):
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 and not quiet else level)
    logging.getLogger("fer_swarm").setLevel(logging.DEBUG if verbose and not quiet else logging.NOTSET)
    logging.captureWarnings(True)  # Python warnings become records, so a JSON stream stays JSON
    if quiet:
        # TensorFlow's own C++ logging (training) reads this when it loads; an explicit setting wins.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if fmt is LogFormat.json:
        _log_uncaught_exceptions()


def _is_terminal(console) -> bool:
    return console.is_terminal if console is not None else sys.stderr.isatty()


def _log_uncaught_exceptions() -> None:
    """A crash is one JSON record too, not a bare traceback in the middle of the stream."""
    crash = logging.getLogger("fer_swarm.crash")

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
        else:
            crash.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    sys.excepthook = hook
    threading.excepthook = lambda args: crash.critical(
        "uncaught exception in thread %s", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


# TFLite's minimal logger ("INFO: ...") and absl/glog ("I0301 12:00:00.000000  123 file.cc:45] ...").
_NATIVE_LINE = re.compile(
    r"^(?:(?P<name>VERBOSE|INFO|WARNING|ERROR|FATAL): (?P<msg>.*)"
    r"|(?P<letter>[IWEF])\d{4} [\d:.]+\s+\d+ [^\]]*\] (?P<amsg>.*))$"
)
_LEVELS = {"VERBOSE": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "FATAL": logging.CRITICAL, "I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
           "F": logging.CRITICAL}
_native_lock = threading.Lock()


@contextmanager
def native_output(logger: str = "tflite") -> Iterator[None]:
    """Log what native code writes to stderr during the block, instead of letting it through raw.

    File descriptor 2 points at a temporary file for the block; afterwards each
    line in a native runtime's log format becomes a record of ``logger`` at
    its level (so ``-q`` hides INFO banners and ``--log-format json`` keeps
    them JSON), and any other line, for instance another thread's log
    record, is written to stderr as it was, a little late but not lost. The
    redirection is process-wide, so blocks are taken one at a time.
    """
    with _native_lock:
        _flush_stderr()
        scratch = _scratch_file()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (closed by a daemon manager): nothing to keep clean
            saved = None
        if scratch is None or saved is None:
            if scratch is not None:
                scratch.close()
            if saved is not None:
                os.close(saved)
            yield
            return
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()
            os.dup2(saved, 2)
            os.close(saved)
            with scratch:
                scratch.seek(0)
                _replay(scratch.read(), logging.getLogger(logger))  # also when the block raised: its why


def _scratch_file():
    """An anonymous file for what native code writes: in memory where Linux allows (a service may have
    no writable /tmp), else a temporary file; None if neither can be had."""
    try:
        return os.fdopen(os.memfd_create("fer-swarm-stderr"), "w+b")
    except (AttributeError, OSError):
        pass
    try:
        return tempfile.TemporaryFile()
    except OSError:
        return None


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def _replay(captured: bytes, log: logging.Logger) -> None:
    raw = []
    for line in captured.decode("utf-8", "replace").splitlines():
        m = _NATIVE_LINE.match(line)
        if m is None:
            raw.append(line + "\n")
        else:
            log.log(_LEVELS[m["name"] or m["letter"]], "%s", m["msg"] if m["name"] else m["amsg"])
    if raw and sys.stderr is not None:
        sys.stderr.write("".join(raw))
        sys.stderr.flush()
