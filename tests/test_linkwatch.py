"""What a client's socket monitor reports for each way a connection to the broker can go wrong, on real sockets.

Each case is the real thing: a ROUTER with CURVE and the project's ZAP
allow-list, a plain TCP listener that never speaks ZeroMQ, a port nobody
listens on. Plus the two small policies of linkwatch, with the clock passed in.
"""

from __future__ import annotations

import socket
import time

import pytest
import zmq

from fer_swarm import security
from fer_swarm.linkwatch import Backoff, Change, Link, LinkWatch, Liveness, foreign_version
from fer_swarm.protocol import PROTOCOL_TAG

from .swarm import free_port, zmq_context


@pytest.fixture
def ctx():
    with zmq_context() as c:
        yield c


@pytest.fixture
def keys(tmp_path):
    for name in ("broker", "pi-1", "stranger", "impostor"):
        security.generate(name, tmp_path)
    allowed = tmp_path / "workers"
    allowed.mkdir()
    (allowed / "pi-1.key").write_bytes((tmp_path / "pi-1.key").read_bytes())
    return tmp_path


def pair(keys, name, broker="broker"):
    return security.load_secret(keys / f"{name}.key_secret"), security.load_public(keys / f"{broker}.key")


@pytest.fixture
def curve_broker(ctx, keys):
    """A ROUTER that does CURVE with the broker's key and checks peers against the workers allow-list (ZAP)."""
    workers = security.AllowList(security.WORKERS_DOMAIN, keys / "workers")
    auth = security.start_authenticator(ctx, security.AllowList(security.CLIENTS_DOMAIN, keys / "workers"), workers)
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    security.make_server(router, security.load_secret(keys / "broker.key_secret"), security.WORKERS_DOMAIN)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    router.close(0)
    auth.stop()


@pytest.fixture
def plain_broker(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    yield f"tcp://127.0.0.1:{port}"
    router.close(0)


def watch_until(ctx, endpoint, curve, until, timeout_s=15.0):
    """Connect a DEALER through a LinkWatch; the watch and every change seen, once ``until(watch)`` or time is up."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if curve:
        security.make_client(sock, *curve)
    watch = LinkWatch(sock, endpoint, role="worker", curve=curve)
    sock.connect(endpoint)
    changes: list[Change] = []
    end = time.monotonic() + timeout_s
    try:
        while not until(watch) and time.monotonic() < end:
            if watch.monitor.poll(50):
                changes += watch.update()
    finally:
        watch.close()
        sock.close(0)
    return watch, changes


def test_a_good_handshake_is_up(ctx, keys, curve_broker):
    watch, changes = watch_until(ctx, curve_broker, pair(keys, "pi-1"), lambda w: w.up)
    assert changes == [Change.UP] and watch.state is Link.UP and watch.failure is None


def test_a_refused_key_is_named_with_its_fingerprint_and_the_zap_status(ctx, keys, curve_broker):
    curve = pair(keys, "stranger")
    watch, changes = watch_until(ctx, curve_broker, curve, lambda w: w.failure)
    assert Change.FAILED in changes and Change.UP not in changes and watch.refused
    assert "refused" in watch.failure and curve[0].fingerprint in watch.failure and "ZAP status 400" in watch.failure
    assert "--worker-keys" in watch.failure


def test_a_wrong_broker_key_is_told_apart_from_a_refused_one(ctx, keys, curve_broker):
    curve = pair(keys, "pi-1", broker="impostor")  # an allowed key, but the broker's key is someone else's
    watch, changes = watch_until(ctx, curve_broker, curve, lambda w: w.failure)
    assert Change.FAILED in changes and not watch.refused
    assert "--broker-key" in watch.failure and security.fingerprint(curve[1]) in watch.failure
    assert "probably not this broker's" in watch.failure


def test_plaintext_against_a_curve_broker_says_curve_is_required(ctx, curve_broker):
    watch, _ = watch_until(ctx, curve_broker, None, lambda w: w.failure)
    assert "requires CURVE" in watch.failure and not watch.refused


def test_curve_against_a_plaintext_broker_says_so(ctx, keys, plain_broker):
    watch, _ = watch_until(ctx, plain_broker, pair(keys, "pi-1"), lambda w: w.failure)
    assert "does not use CURVE" in watch.failure


def test_nothing_listening_is_told_from_a_listener_that_never_speaks_zeromq(ctx):
    # A port nobody listens on: libzmq retries, never connects.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    watch, changes = watch_until(ctx, endpoint, None, lambda w: False, timeout_s=0.5)
    assert not changes and not watch.ever_connected
    assert "nothing accepted a connection" in watch.explain_silence(0.5)
    # A plain TCP listener: the kernel accepts the connection, but no ZeroMQ greeting ever comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        watch, changes = watch_until(ctx, endpoint, None, lambda w: w.ever_connected)
    assert watch.ever_connected and not watch.up and Change.UP not in changes
    assert "never completed the ZeroMQ handshake" in watch.explain_silence(3)


def test_a_lost_connection_is_reported_once_it_was_up(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    watch = LinkWatch(sock, endpoint, role="client")
    sock.connect(endpoint)
    changes: list[Change] = []
    try:
        end = time.monotonic() + 15
        while not watch.up and time.monotonic() < end:
            if watch.monitor.poll(50):
                changes += watch.update()
        router.close(0)
        while Change.LOST not in changes and time.monotonic() < end:
            if watch.monitor.poll(50):
                changes += watch.update()
    finally:
        watch.close()
        sock.close(0)
    assert changes[:2] == [Change.UP, Change.LOST] and watch.state is Link.DOWN


def test_foreign_version_names_the_peers_tag():
    assert foreign_version([b"fer-swarm/4", b"ERROR", b"{}"]) == "fer-swarm/4"
    assert foreign_version([zmq.Frame(b"fer-swarm/1"), b"ERROR", b"{}"]) == "fer-swarm/1"
    assert foreign_version([PROTOCOL_TAG, b"ERROR", b"{}"]) is None
    assert foreign_version([b"HTTP/1.1 400", b""]) is None and foreign_version([]) is None


def test_liveness_does_not_count_its_own_stall_against_the_peer():
    live = Liveness(interval_s=1.0, intervals=3, now=0.0)
    # The loop itself stalls for 10 s (a starved host): only one interval of it counts.
    assert not live.tick(10.0) and live.silent_s == 1.0
    assert not live.tick(10.5) and not live.tick(11.0) and not live.tick(12.0)  # 3.0 s: not yet over the limit
    assert live.tick(12.1)  # silent for more than 3 intervals of its own running time
    live.heard(12.2)
    assert live.silent_s == 0 and not live.tick(13.0)
    assert not live.tick(12.0)  # a clock that steps back adds nothing


def test_backoff_doubles_to_its_cap_with_jitter_and_resets():
    spread = iter([0.0, 1.0 - 1e-9, 0.5, 0.5, 0.5, 0.5, 0.5])
    b = Backoff(0.5, 4.0, rand=lambda: next(spread))
    delays = [b.next() for _ in range(6)]
    assert delays[0] == pytest.approx(0.375) and delays[1] == pytest.approx(1.25)  # 0.5 -25 %, 1.0 +25 %
    assert delays[2:] == pytest.approx([2.0, 4.0, 4.0, 4.0])  # doubling stops at the cap
    b.reset()
    assert b.next() == pytest.approx(0.5)
    real = Backoff(1.0, 1.0)
    assert all(0.75 <= real.next() <= 1.25 for _ in range(200))
