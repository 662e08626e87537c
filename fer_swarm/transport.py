"""Sending and draining ZeroMQ sockets on the hot path, and translating their errors.

Two things measured in the broker's profile live here so every program gets
them: pyzmq's flags are ``IntFlag`` members, and combining them once per
frame (as ``send_multipart`` does) runs through enum code; and draining a
socket until ``zmq.Again`` pays for raising an exception every time it runs
dry, where asking ``EVENTS`` is cheap. ``zmq.ZMQError`` becomes
:class:`TransportError` here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import zmq

from .errors import TransportError

NOBLOCK, SNDMORE, POLLIN = int(zmq.NOBLOCK), int(zmq.SNDMORE), int(zmq.POLLIN)
# Errors that mean "this peer cannot take it now": gone (ROUTER_MANDATORY) or not reading (high-water mark).
PEER_UNAVAILABLE = (zmq.EHOSTUNREACH, zmq.EAGAIN)


def send_frames(sock: zmq.Socket, frames: Sequence[bytes]) -> bool:
    """Send a multipart message without blocking; False if the peer is gone or not reading."""
    last = len(frames) - 1
    try:
        for i, frame in enumerate(frames):
            sock.send(frame, NOBLOCK | SNDMORE if i < last else NOBLOCK)
    except zmq.ZMQError as e:
        if e.errno in PEER_UNAVAILABLE:
            return False
        raise TransportError(f"send failed: {e.strerror}") from e
    return True


def drain(sock: zmq.Socket, limit: int) -> Iterator[list[bytes]]:
    """The messages waiting on ``sock`` now, at most ``limit`` of them (so one socket cannot starve another)."""
    for _ in range(limit):
        if not sock.getsockopt(zmq.EVENTS) & POLLIN:
            return
        yield sock.recv_multipart(NOBLOCK)
