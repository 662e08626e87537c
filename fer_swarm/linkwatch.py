"""A client's link to the broker, as an operator needs to hear about it: handshake, liveness, reconnect delays.

libzmq connects, handshakes and reconnects out of sight: a refused key, a
wrong broker key and an empty address all look the same from ``send`` and
``recv`` (nothing ever arrives). Its socket monitor does tell them apart, and
:class:`LinkWatch` turns those events into one state and one sentence. The
worker and the edge client both use it, with :class:`Liveness` (is the broker
still talking?) and, for the worker, :class:`Backoff` (when to try again).

What the connecting side sees, measured with libzmq 4.3.5 (pyzmq 27.3;
``tests/test_linkwatch.py`` checks each row on real sockets):

=============================  ================================================================
situation                      monitor events on the client's socket
=============================  ================================================================
all well                       CONNECTED, HANDSHAKE_SUCCEEDED
nothing listening              CONNECT_DELAYED, CLOSED, CONNECT_RETRIED, ... (never CONNECTED)
listening, never speaks ZMTP   CONNECTED, then nothing (a stopped broker, not a ZeroMQ port)
broker refuses our key (ZAP)   CONNECTED, HANDSHAKE_FAILED_AUTH with the ZAP status code as value
                               (400: not in the allow-list), DISCONNECTED; again on each retry
our broker_key is not the      CONNECTED, HANDSHAKE_FAILED_NO_DETAIL with an errno as value
broker's                       (EPIPE or ECONNRESET), DISCONNECTED; again on each retry. The
                               broker cannot decrypt our CURVE HELLO and hangs up without a
                               word (it sees PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC; we see no detail)
CURVE on one side only         CONNECTED, HANDSHAKE_FAILED_PROTOCOL with value
                               PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
=============================  ================================================================

A protocol *version* mismatch is not a handshake matter: the broker answers
in its own version (an ERROR whose first frame is another ``fer-swarm/N``),
which :func:`foreign_version` recognises.
"""

from __future__ import annotations

import enum
import errno
import random
from collections.abc import Callable, Sequence

import zmq
from zmq.utils.monitor import parse_monitor_message

from .protocol import PROTOCOL_TAG
from .security import KeyPair, fingerprint

__all__ = ["Backoff", "Change", "Link", "LinkWatch", "Liveness", "foreign_version"]

_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# Monitor events read per update() at most: libzmq retries every 100 ms, so a backlog is small.
_MAX_EVENTS = 256
_TAG_PREFIX = PROTOCOL_TAG.split(b"/")[0] + b"/"


class Link(enum.Enum):
    """How far the connection got."""

    DOWN = "down"  # no TCP connection (never, or not now)
    CONNECTED = "connected"  # TCP is up, the ZeroMQ handshake is not finished
    UP = "up"  # handshake done: messages flow


class Change(enum.Enum):
    """What :meth:`LinkWatch.update` reports."""

    UP = "handshake succeeded"
    LOST = "connection lost"  # it was UP and dropped; libzmq is reconnecting
    FAILED = "handshake failed"  # :attr:`LinkWatch.failure` says why


class LinkWatch:
    """The monitor of one client socket (DEALER) to the broker, read without blocking.

    Create it before ``sock.connect`` so no event is missed; poll
    :attr:`monitor` beside the socket and call :meth:`update` when it is
    readable; :meth:`close` it before the socket. ``role`` is ``"client"`` or
    ``"worker"``: it names the broker's port and allow-list in messages.
    """

    def __init__(self, sock: zmq.Socket, endpoint: str, *, role: str, curve: tuple[KeyPair, bytes] | None = None):
        self.endpoint = endpoint
        self.role = role
        self.curve = curve
        self.state = Link.DOWN
        self.ever_connected = False  # TCP, at least once
        self.failure: str | None = None  # the latest handshake failure, in words; cleared by success
        self.refused = False  # the latest failure was the broker refusing our key
        self._sock = sock
        self.monitor = sock.get_monitor_socket(_EVENTS)

    @property
    def up(self) -> bool:
        return self.state is Link.UP

    def update(self) -> list[Change]:
        """Read the monitor's pending events; the changes they made, in order."""
        changes: list[Change] = []
        for _ in range(_MAX_EVENTS):
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = parse_monitor_message(frames)
            change = self._on_event(event["event"], event["value"])
            if change is not None:
                changes.append(change)
        return changes

    def _on_event(self, event: int, value: int) -> Change | None:
        if event == zmq.EVENT_CONNECTED:
            self.state, self.ever_connected = Link.CONNECTED, True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.state, self.failure, self.refused = Link.UP, None, False
            return Change.UP
        elif event == zmq.EVENT_DISCONNECTED:
            was_up, self.state = self.up, Link.DOWN
            return Change.LOST if was_up else None
        else:  # one of the HANDSHAKE_FAILED events
            self.state = Link.DOWN  # libzmq drops the connection (DISCONNECTED follows) and retries
            self.refused = event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            self.failure = self._explain_failure(event, value)
            return Change.FAILED
        return None

    def _explain_failure(self, event: int, value: int) -> str:
        where = f"the broker at {self.endpoint}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = f"key {self.curve[0].fingerprint}" if self.curve else "connection"
            return (f"{where} refused this {self.role}'s {key} (ZAP status {value}): copy this machine's public "
                    f"key (NAME.key beside the secret key) into the broker's allowed {self.role} keys folder "
                    f"(--{self.role}-keys), and check that this is its {self.role}s' port")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.curve:
                return (f"{where} does not use CURVE encryption but this {self.role} does: give the broker "
                        "--secret-key and allow-lists (docs/security.md), or drop --secret-key/--broker-key here")
            return (f"{where} requires CURVE encryption: give --secret-key and --broker-key "
                    "(docs/security.md: fer-swarm keys generate NAME)")
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.curve:
            return (f"{where} hung up during the CURVE handshake ({_errno_name(value)}): the broker key "
                    f"{fingerprint(self.curve[1])} given with --broker-key is probably not this broker's "
                    "(compare it with the key fingerprint the broker logs when it starts)")
        what = _protocol_error_name(value) if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else _errno_name(value)
        return f"the ZeroMQ handshake with {self.endpoint} failed ({what}): is it a fer-swarm broker?"

    def explain_silence(self, waited_s: float) -> str:
        """Why nothing was heard from the broker in ``waited_s``, as far as the link can tell."""
        head = f"no broker answered at {self.endpoint} within {round(waited_s, 1):g} s"
        if self.failure:
            return f"{head}: {self.failure}"
        if self.up:
            return (f"{head}: the connection is up but nothing answered "
                    f"(is this the broker's port for {self.role}s, and is the broker overloaded?)")
        if self.ever_connected:
            return (f"{head}: something accepted the connection but never completed the ZeroMQ handshake "
                    "(is it a fer-swarm broker, and is it stopped or starved?)")
        return (f"{head}: nothing accepted a connection there "
                "(is `fer-swarm broker` running, is the address right, does a firewall drop it?)")

    def close(self) -> None:
        if not self.monitor.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass  # the socket is already closed: so is its monitoring
            self.monitor.close(0)


def foreign_version(frames: Sequence[bytes | zmq.Frame]) -> str | None:
    """The peer's protocol tag (e.g. ``"fer-swarm/4"``) when ``frames`` speak another version, else None."""
    if not frames:
        return None
    tag = bytes(frames[0].bytes if isinstance(frames[0], zmq.Frame) else frames[0])[:32]
    if tag.startswith(_TAG_PREFIX) and tag.strip() != PROTOCOL_TAG:  # white space is a malformed tag, not a version
        return tag.decode("ascii", "replace")
    return None


def _errno_name(value: int) -> str:
    return errno.errorcode.get(value, f"errno {value}")


def _protocol_error_name(value: int) -> str:
    for name in dir(zmq):
        if name.startswith("PROTOCOL_ERROR_") and getattr(zmq, name) == value:
            return name
    return f"protocol error {value:#x}"


class Liveness:
    """How long the peer has been silent, counted in this loop's own running time.

    The clock is passed in. Each :meth:`tick` adds the time since the last one,
    but at most one ``interval_s``: when this process was starved (the host
    swapping, the loop stuck behind a slow frame) for longer than an interval,
    the peer's heartbeats were as likely waiting in our socket as missing, so
    the stall is not counted against the peer. The peer is dead after
    ``intervals`` intervals of silence so counted.
    """

    def __init__(self, interval_s: float, intervals: int, now: float):
        self.interval_s = interval_s
        self.limit_s = interval_s * intervals
        self.silent_s = 0.0
        self._last = now

    def heard(self, now: float) -> None:
        self.silent_s = 0.0
        self._last = now

    def tick(self, now: float) -> bool:
        """Count the time since the last tick; True when the peer is to be declared dead."""
        self.silent_s += min(max(0.0, now - self._last), self.interval_s)
        self._last = now
        return self.silent_s > self.limit_s


class Backoff:
    """Reconnect delays: ``initial_s`` doubling up to ``cap_s``, each one spread +-25% at random.

    The jitter keeps a fleet of workers that lost the broker together from
    coming back in lockstep; the cap keeps a worker whose key is refused
    trying at a pace the broker's log can bear. ``rand`` returns [0, 1).
    """

    JITTER = 0.25

    def __init__(self, initial_s: float, cap_s: float, rand: Callable[[], float] = random.random):
        self.initial_s = initial_s
        self.cap_s = max(cap_s, initial_s)
        self._rand = rand
        self._next_s = initial_s

    def reset(self) -> None:
        self._next_s = self.initial_s

    def next(self) -> float:
        """The delay to wait now; the one after it doubles, up to the cap."""
        base = self._next_s
        self._next_s = min(base * 2, self.cap_s)
        return base * (1 + self.JITTER * (2 * self._rand() - 1))
