"""The student prototype's design, reproduced as the benchmark's baseline: one face at a time over one TCP socket.

The prototype sent each face crop as a pickled array over a raw TCP socket to
a single server and waited for the answer before sending the next face. This
module keeps that design (one server thread, one client at a time, strict
request/response, no pipelining) and changes only the serializer: numpy's
``.npy`` format with ``allow_pickle=False``, the same array-on-the-wire idea
without handing the server code to execute.

Wire format (all lengths 4-byte unsigned big-endian)::

    request:  LENGTH | .npy bytes of one uint8 H x W crop   (LENGTH <= 1 MiB)
    reply:    LENGTH | UTF-8 text: the label, or "ERROR: reason"

A malformed request (not ``.npy``, an object array that would need pickle,
another dtype or rank, a header promising more pixels than it carries) gets an
``ERROR`` reply on the same connection. A length prefix over 1 MiB gets an
``ERROR`` reply and then the connection is closed, because the server cannot
trust that length to skip the body and find the next request. Either way the
server goes on serving.

Run a server with ``python -m fer_swarm.bench.prototype serve --port P``.
"""

from __future__ import annotations

import argparse
import io
import logging
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import FerSwarmError, ModelError, ProtocolError, TransportError
from ..model import DEFAULT_MODEL, Classifier
from .load import LoadResult, Window

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 1 << 20
MAX_REPLY_BYTES = 64 * 1024
POLL_S = 0.1  # how often a blocked server thread looks at its stop flag
LINGER_S = 1.0  # how long a closing connection's unread input is drained so the ERROR reply survives
LINGER_BYTES = 4 * MAX_REQUEST_BYTES
STOP_TIMEOUT_S = 5.0
_LENGTH = struct.Struct(">I")


class _Stopped(Exception):
    """The server was asked to stop while it waited on a socket."""


# --------------------------------------------------------------------------- wire format


def encode_request(crop: np.ndarray) -> bytes:
    """One request frame: length prefix and the ``.npy`` bytes of ``crop`` (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(crop), allow_pickle=False)
    body = buf.getvalue()
    return _LENGTH.pack(len(body)) + body


def encode_reply(text: str) -> bytes:
    body = text.encode("utf-8")
    return _LENGTH.pack(len(body)) + body


def decode_crop(body: bytes) -> np.ndarray:
    """The uint8 H x W crop in a request body.

    Raises :class:`ProtocolError` for anything else, and checks the ``.npy``
    header before reading the data, so a header that declares a huge array
    costs nothing and an object array is refused before pickle is involved.
    """
    buf = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ProtocolError(f".npy format version {version[0]}.{version[1]} is not accepted (1.0 or 2.0)")
    except (ValueError, TypeError, EOFError) as e:  # how numpy's header readers report malformed bytes
        raise ProtocolError(f"not a .npy array: {e}") from e
    if dtype.hasobject:
        raise ProtocolError("object arrays need pickle, which this server refuses")
    if dtype != np.uint8 or len(shape) != 2:
        raise ProtocolError(f"expected a uint8 H x W crop, got {dtype} with shape {shape}")
    pixels, carried = shape[0] * shape[1], len(body) - buf.tell()
    if pixels != carried:
        raise ProtocolError(f"header declares {pixels} pixels but {carried} bytes follow it")
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ProtocolError(f"unreadable .npy array: {e}") from e


def _recv_exact(sock: socket.socket, n: int, stop: threading.Event | None = None) -> bytes | None:
    """Exactly ``n`` bytes from ``sock``, or None if the peer closed first.

    Without ``stop`` a socket timeout is final and raises; with ``stop`` the
    socket's timeout is only a poll interval and :class:`_Stopped` is raised
    once ``stop`` is set.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            if stop is None:
                raise
            if stop.is_set():
                raise _Stopped from None
            continue
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _nodelay(sock: socket.socket) -> None:
    # One small frame per round trip: Nagle would hold it back waiting for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --------------------------------------------------------------------------- server


class PrototypeServer:
    """The prototype's server: one thread that accepts one client and serves it until it disconnects.

    Each request is classified by the real model on a single-thread
    interpreter. With ``service_time_ms`` > 0 every answer takes at least that
    long (the remainder is slept), to stand in for a Raspberry Pi. Listens on
    127.0.0.1:``port`` (0 picks a free port, read :attr:`port` after
    :meth:`start`). :meth:`start` loads the model before it listens, so a model
    error raises there (:class:`ModelError`); a port that cannot be bound raises
    :class:`TransportError`. :meth:`stop` may be called any number of times.
    """

    def __init__(self, port: int = 0, *, model_path: str | Path | None = None, service_time_ms: float = 0.0):
        if service_time_ms < 0:
            raise ValueError(f"service_time_ms must be >= 0, got {service_time_ms}")
        self.port = port
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        self.service_time_s = service_time_ms / 1000
        self.classifier: Classifier | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PrototypeServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a PrototypeServer can be started only once")
        self.classifier = Classifier(self.model_path, threads=1)
        try:
            listener = socket.create_server((LISTEN_HOST, self.port))
        except OSError as e:
            raise TransportError(f"prototype server cannot listen on {LISTEN_HOST}:{self.port}: {e}") from e
        listener.settimeout(POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"prototype-{self.port}", daemon=True)
        self._thread.start()
        log.info("prototype server on %s:%d, model %s, service time %g ms", LISTEN_HOST, self.port,
                 self.classifier.card.model_id, self.service_time_s * 1000)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("prototype server on port %d did not stop within %s s", self.port, STOP_TIMEOUT_S)

    def _serve(self) -> None:
        listener = self._listener
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    continue
                except OSError as e:  # e.g. out of file descriptors: wait rather than spin
                    log.warning("prototype server: accept failed: %s", e)
                    self._stop.wait(POLL_S)
                    continue
                with conn:
                    try:
                        self._serve_client(conn)
                    except _Stopped:
                        return
                    except OSError as e:
                        log.debug("prototype server: client %s dropped: %s", peer, e)
                    except Exception:  # bad input must never end the server, only this client
                        log.exception("prototype server: client %s dropped after an unexpected error", peer)
        finally:
            listener.close()
            log.info("prototype server on port %d stopped", self.port)

    def _serve_client(self, conn: socket.socket) -> None:
        conn.settimeout(POLL_S)
        _nodelay(conn)
        while True:
            header = _recv_exact(conn, _LENGTH.size, self._stop)
            if header is None:
                return
            (length,) = _LENGTH.unpack(header)
            if length > MAX_REQUEST_BYTES:
                limit = MAX_REQUEST_BYTES
                conn.sendall(encode_reply(f"ERROR: request of {length} bytes is over the {limit} byte limit"))
                self._linger_close(conn)
                return
            body = _recv_exact(conn, length, self._stop)
            if body is None:
                return
            started = time.perf_counter()
            reply = self._answer(body)
            pad_s = self.service_time_s - (time.perf_counter() - started)
            if pad_s > 0:
                self._stop.wait(pad_s)
            conn.sendall(encode_reply(reply))

    def _answer(self, body: bytes) -> str:
        try:
            probs = self.classifier.predict(decode_crop(body))
        except (ProtocolError, ModelError) as e:
            log.debug("prototype server: bad request: %s", e)
            return f"ERROR: {e}"
        return self.classifier.labels[int(np.argmax(probs))]

    @staticmethod
    def _linger_close(conn: socket.socket) -> None:
        # Closing a socket with unread input makes the kernel send RST, and an RST can
        # destroy the ERROR reply before the client reads it: so stop writing, then read
        # and discard what the client still sends (bounded in time and bytes) before closing.
        conn.shutdown(socket.SHUT_WR)
        end, drained = time.monotonic() + LINGER_S, 0
        while drained < LINGER_BYTES and time.monotonic() < end:
            try:
                data = conn.recv(64 * 1024)
            except TimeoutError:
                continue
            if not data:
                return
            drained += len(data)


# --------------------------------------------------------------------------- client


def _recv_reply(sock: socket.socket) -> str:
    header = _recv_exact(sock, _LENGTH.size)
    if header is None:
        raise ConnectionResetError("server closed the connection")
    (length,) = _LENGTH.unpack(header)
    if length > MAX_REPLY_BYTES:
        raise ProtocolError(f"reply of {length} bytes is over the {MAX_REPLY_BYTES} byte limit")
    body = _recv_exact(sock, length)
    if body is None:
        raise ConnectionResetError("server closed the connection mid-reply")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"reply is not UTF-8: {e}") from e


def run_prototype_client(host: str, port: int, crop: np.ndarray, *, window_s: float, windows: int,
                         timeout_s: float = 5.0) -> LoadResult:
    """Drive a prototype server as the prototype's client did: one request, wait for its reply, repeat.

    Connects once (a failure raises :class:`TransportError`), then sends
    ``crop`` over and over for ``windows`` windows of ``window_s`` seconds.
    Each reply is counted in the window it arrived in: a label in ``results``
    with its round-trip latency in ``latencies_ms``, an ``ERROR`` reply in
    ``errors``. A reply arriving after the last window is counted in no window.
    A reply not received within ``timeout_s``, a lost connection or a malformed
    reply counts in ``unanswered`` and ends the run, as it ended the prototype:
    the remaining windows stay empty.
    """
    if window_s <= 0 or windows < 1:
        raise ValueError(f"need window_s > 0 and windows >= 1, got {window_s} and {windows}")
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise TransportError(f"cannot connect to the prototype server at {host}:{port}: {e}") from e
    out = [Window(window_s) for _ in range(windows)]
    sent = unanswered = 0
    with sock:
        _nodelay(sock)
        start = time.perf_counter()
        end = start + window_s * windows
        while time.perf_counter() < end:
            request = encode_request(crop)  # serialized per request, as the prototype did
            t0 = time.perf_counter()
            sent += 1
            try:
                sock.sendall(request)
                reply = _recv_reply(sock)
            except (OSError, ProtocolError) as e:
                log.warning("prototype client: no answer from %s:%d: %s", host, port, e or "timed out")
                unanswered += 1
                break
            t1 = time.perf_counter()
            k = int((t1 - start) / window_s)
            if k >= windows:
                break
            if reply.startswith("ERROR"):
                out[k].errors += 1
            else:
                out[k].results += 1
                out[k].latencies_ms.append((t1 - t0) * 1000)
    return LoadResult(out, sent, unanswered)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_swarm.bench.prototype", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run a prototype server until SIGTERM or Ctrl-C.")
    serve.add_argument("--port", type=int, default=0, help="Port to listen on at 127.0.0.1 (0: any free port).")
    serve.add_argument("--model", type=Path, default=None, help=f"TFLite model [default: {DEFAULT_MODEL}].")
    serve.add_argument("--service-time-ms", type=float, default=0.0,
                       help="Pad every answer to at least this many ms, to stand in for a slower machine.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = PrototypeServer(args.port, model_path=args.model, service_time_ms=args.service_time_ms)
        server.start()
    except (ValueError, FerSwarmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"prototype server on {LISTEN_HOST}:{server.port}, model {server.classifier.card.model_id}, "
              f"service time {args.service_time_ms:g} ms", flush=True)
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
