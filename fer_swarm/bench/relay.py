"""A TCP relay that holds every chunk for a fixed one-way delay: Wi-Fi latency on loopback.

The kernels the benchmark runs on may lack ``netem``, so the benchmark puts one
of these on each link instead. A :class:`Relay` listens on 127.0.0.1, opens a
connection to its target for every connection it accepts, and forwards bytes
both ways. Each chunk is held for ``one_way_delay_s`` counted from the moment it
was read, so a request/response round trip gains ``2 * one_way_delay_s``.

Scheduling is per chunk, never per byte: each direction keeps a deque of
``(due_time, bytes)`` in read order and one task that sleeps until the head is
due and then writes everything already due in one go. One writer per direction
and FIFO order mean bytes are never reordered within a direction.

Backpressure: a direction stops reading its source while more than
``max_pending_bytes`` wait in it (queued or not yet drained by the destination's
transport), so a slow receiver slows the sender as it would on a real link
instead of growing the relay's memory.

Faults: :meth:`Relay.stall` stops forwarding both ways on every connection (a
partition: bytes read are held, nothing more is read, new connections are
accepted but not relayed) until :meth:`Relay.resume`, which delivers what was
held; :meth:`Relay.cut` resets every connection (TCP RST, as a crashed router
or a NAT dropping state would), and new ones are relayed as before.

Closing: when either side closes (or resets, or cannot be written to), the
relay stops reading both sides, still delivers every chunk it already holds in
either direction (waiting at most the delay plus ``FLUSH_TIMEOUT_S``), and then
closes both connections. Nothing half-closes: the links it stands in for carry
ZeroMQ and the prototype's protocol, and neither uses a half-open connection.

Run one from the shell with
``python -m fer_swarm.bench.relay --listen PORT --target HOST:PORT --delay-ms ONE_WAY_MS``;
there SIGUSR1 stalls the link or resumes it, and SIGUSR2 cuts its connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import struct
import sys
import threading
from collections import deque

from ..errors import TransportError

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 5.0  # beyond the delay, how long a closing pair waits for a slow reader to take what is held


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # asyncio already sets TCP_NODELAY on TCP transports; set it anyway because the
    # delay measured must be the relay's alone, never Nagle's.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Direction:
    """One direction of one relayed connection: read chunks, hold each for the delay, write them in order.

    Starts its two tasks at once. :attr:`writer` finishes normally when the
    source has ended and every held chunk is written, or with the error when
    the destination fails.
    """

    def __init__(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay_s: float, max_pending_bytes: int,
                 flowing: asyncio.Event):
        self._src, self._dst = src, dst
        self._flowing = flowing  # cleared while the relay is stalled: nothing is read or written
        self._delay_s = delay_s
        self._max_pending = max_pending_bytes
        self._queue: deque[tuple[float, bytes]] = deque()
        self._pending = 0  # bytes read and not yet drained by dst's transport
        self._src_done = False
        self._queued = asyncio.Event()  # a chunk was queued or the source ended
        self._room = asyncio.Event()  # pending fell to the limit again
        self._room.set()
        self._reader = asyncio.ensure_future(self._read_loop())
        self.writer = asyncio.ensure_future(self._write_loop())

    def stop_reading(self) -> None:
        """Read nothing more; the writer still delivers what is held and then finishes."""
        self._reader.cancel()

    def cancel(self) -> None:
        """Drop everything; log why the direction ended (which also retrieves its tasks' errors)."""
        for task in (self._reader, self.writer):
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.debug("relay direction ended: %r", task.exception())

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._pending > self._max_pending:
                    self._room.clear()
                    await self._room.wait()
                await self._flowing.wait()
                chunk = await self._src.read(CHUNK_BYTES)
                if not chunk:
                    return
                # Due time is fixed at read time, so time spent queued behind earlier chunks
                # counts towards the delay instead of adding to it.
                self._queue.append((loop.time() + self._delay_s, chunk))
                self._pending += len(chunk)
                self._queued.set()
        finally:
            self._src_done = True
            self._queued.set()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._src_done:
                    return
                self._queued.clear()
                await self._queued.wait()
            wait_s = self._queue[0][0] - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not self._flowing.is_set():
                # Stalled: what is due stays held. A chunk read before the stall was already on
                # its way; holding it too keeps "nothing moves" exact.
                await self._flowing.wait()
                continue
            if self._dst.is_closing():
                raise ConnectionResetError("destination closed")
            # The head is due; everything else already due goes in the same write and drain.
            now = loop.time()
            batch = [self._queue.popleft()[1]]
            while self._queue and self._queue[0][0] <= now:
                batch.append(self._queue.popleft()[1])
            self._dst.writelines(batch)
            await self._dst.drain()
            self._pending -= sum(map(len, batch))
            if self._pending <= self._max_pending:
                self._room.set()


class Relay:
    """A delaying TCP relay from 127.0.0.1:``listen_port`` to ``target``, run by asyncio in a background thread.

    ``listen_port`` 0 picks a free port; :attr:`port` holds the real one once
    :meth:`start` returns. Any number of connections are relayed at once, each to
    its own connection to ``target``. :meth:`start` returns once listening and
    raises :class:`TransportError` if it cannot listen; :meth:`stop` closes every
    connection and joins the thread, and may be called any number of times.
    """

    def __init__(self, listen_port: int, target: tuple[str, int], one_way_delay_s: float, *,
                 max_pending_bytes: int = 4 << 20):
        if not 0 <= listen_port <= 65535:
            raise ValueError(f"listen_port must be 0..65535, got {listen_port}")
        if one_way_delay_s < 0:
            raise ValueError(f"one_way_delay_s must be >= 0, got {one_way_delay_s}")
        if max_pending_bytes <= 0:
            raise ValueError(f"max_pending_bytes must be > 0, got {max_pending_bytes}")
        self.port = listen_port
        self.target = (target[0], int(target[1]))
        self.one_way_delay_s = float(one_way_delay_s)
        self.max_pending_bytes = max_pending_bytes
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._flowing: asyncio.Event | None = None
        self._pairs: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # both ends of every relayed connection, for cut()

    @property
    def connections(self) -> int:
        """How many client connections are being relayed right now (a snapshot from another thread)."""
        return len(self._pairs)

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a Relay can be started only once")
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise TransportError(f"relay did not start listening within {START_TIMEOUT_S} s")
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT_S)
            raise TransportError(f"relay cannot listen on {LISTEN_HOST}:{self.port}: {self._error}") from self._error

    def stall(self) -> None:
        """Stop forwarding both ways on every connection, new ones included, until :meth:`resume`.

        A partition as the two ends see it: their connections stay open, nothing arrives. What
        was read before is held, and delivered on resume (if the ends have not given up).
        """
        self._call(lambda: self._flowing.clear())

    def resume(self) -> None:
        """Forward again after :meth:`stall`."""
        self._call(lambda: self._flowing.set())

    def cut(self) -> None:
        """Reset every relayed connection now (TCP RST both ways, nothing held is delivered).

        New connections are relayed as usual (a cut while stalled leaves the relay stalled).
        """
        self._call(self._reset_all)

    def _call(self, fn) -> None:
        """Run ``fn`` in the relay's loop and wait until it has run."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the relay is not running")
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        if not done.wait(STOP_TIMEOUT_S):
            raise TransportError(f"relay on port {self.port} did not answer within {STOP_TIMEOUT_S} s")

    def _reset_all(self) -> None:
        for w in list(self._writers):
            sock = w.get_extra_info("socket")
            if sock is not None:
                # Linger on, timeout 0: close() sends RST instead of FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        for task in list(self._pairs):
            task.cancel()

    def stop(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(stopping.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("relay on port %d did not stop within %s s", self.port, STOP_TIMEOUT_S)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            if self._ready.is_set():
                log.exception("relay on port %d failed", self.port)
            else:  # reported by start() in the caller's thread
                self._error = e
                self._ready.set()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._relay_pair, LISTEN_HOST, self.port)
        self.port = server.sockets[0].getsockname()[1]
        log.info("relay %s:%d -> %s:%d started, one-way delay %g ms", LISTEN_HOST, self.port, *self.target,
                 self.one_way_delay_s * 1000)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._pairs):
                task.cancel()
            await asyncio.gather(*self._pairs, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), STOP_TIMEOUT_S)
            log.info("relay on port %d stopped", self.port)

    async def _relay_pair(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._pairs.add(task)
        peer = c_writer.get_extra_info("peername")
        t_writer = None
        self._writers.add(c_writer)
        try:
            # Stalled: accept, but reach nothing (a partitioned link completes no handshake).
            await self._flowing.wait()
            try:
                t_reader, t_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError) as e:
                log.warning("relay cannot reach %s:%d for %s: %s", *self.target, peer, e or "timed out")
                return
            self._writers.add(t_writer)
            _nodelay(c_writer)
            _nodelay(t_writer)
            log.debug("relaying %s <-> %s:%d", peer, *self.target)
            directions = (_Direction(c_reader, t_writer, self.one_way_delay_s, self.max_pending_bytes, self._flowing),
                          _Direction(t_reader, c_writer, self.one_way_delay_s, self.max_pending_bytes, self._flowing))
            try:
                writers = [d.writer for d in directions]
                await asyncio.wait(writers, return_when=asyncio.FIRST_COMPLETED)
                # One side closed or failed: deliver what is already held both ways, then close both
                # (a stalled relay delivers nothing, so a pair closing meanwhile waits at most this long).
                for d in directions:
                    d.stop_reading()
                await asyncio.wait(writers, timeout=self.one_way_delay_s + FLUSH_TIMEOUT_S)
            finally:
                for d in directions:
                    d.cancel()
            log.debug("relay pair for %s ended", peer)
        except asyncio.CancelledError:
            # Only stop() cancels a pair. Return instead of re-raising: on Python 3.11 the
            # server's callback reports a cancelled handler task as an error.
            pass
        finally:
            for w in (c_writer, t_writer):
                if w is not None:
                    w.close()
                    self._writers.discard(w)
            self._pairs.discard(task)


def _parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_swarm.bench.relay", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="Port to listen on at 127.0.0.1 (0: any free port).")
    parser.add_argument("--target", type=_parse_target, required=True, help="Where to relay to, as HOST:PORT.")
    parser.add_argument("--delay-ms", type=float, required=True, help="One-way delay added to every chunk, in ms.")
    parser.add_argument("--max-pending-bytes", type=int, default=4 << 20,
                        help="Stop reading a side while more than this many bytes wait in its direction.")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        relay = Relay(args.listen, args.target, args.delay_ms / 1000, max_pending_bytes=args.max_pending_bytes)
        relay.start()
    except (ValueError, TransportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stalled = False

    def toggle_stall(*_) -> None:
        nonlocal stalled
        stalled = not stalled
        (relay.stall if stalled else relay.resume)()
        log.info("relay %s", "stalled" if stalled else "resumed")

    def cut(*_) -> None:
        relay.cut()
        log.info("relay cut its connections")

    signal.signal(signal.SIGUSR1, toggle_stall)
    signal.signal(signal.SIGUSR2, cut)
    try:
        host, port = args.target
        print(f"relay {LISTEN_HOST}:{relay.port} -> {host}:{port}, one-way delay {args.delay_ms:g} ms", flush=True)
        stop.wait()
    finally:
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
