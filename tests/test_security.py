"""CURVE on every link, allow-lists through ZAP, and key-file errors, over real sockets."""

from __future__ import annotations

import logging
import os

import pytest

from fer_swarm import protocol as p
from fer_swarm import security
from fer_swarm.config import BrokerSettings, WorkerSettings
from fer_swarm.errors import ConfigError
from fer_swarm.worker import Worker

from .conftest import error_lines, run_cli
from .swarm import BrokerThread, Client, WorkerThread, wait_for, zmq_context


@pytest.fixture
def keys(tmp_path):
    """broker, two allowed parties (edge 'headset', worker 'pi-1') and one stranger."""
    d = tmp_path / "keys"
    for name in ("broker", "headset", "pi-1", "stranger", "rogue-pi"):
        security.generate(name, d / "all")
    (d / "clients").mkdir()
    (d / "workers").mkdir()
    (d / "clients" / "headset.key").write_bytes((d / "all" / "headset.key").read_bytes())
    (d / "workers" / "pi-1.key").write_bytes((d / "all" / "pi-1.key").read_bytes())
    return d


def secure_broker(ctx, keys):
    return BrokerThread(ctx, secret_key=keys / "all" / "broker.key_secret", client_keys=keys / "clients",
                        worker_keys=keys / "workers")


def curve(keys, name):
    return security.load_secret(keys / "all" / f"{name}.key_secret"), security.load_public(keys / "all" / "broker.key")


def test_allowed_keys_connect_and_get_results(keys):
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        w = WorkerThread(ctx, b.backend, secret_key=keys / "all" / "pi-1.key_secret", broker_key=keys / "all" / "broker.key")
        c = Client(ctx, b.frontend, curve=curve(keys, "headset"))
        try:
            c.welcome()
            cid = c.job(1)
            r = c.recv(5)
            assert isinstance(r, p.Result) and r.ids == (cid,)
            assert b.broker.security is not None
        finally:
            c.close()
            w.stop()
            b.stop()


def test_unknown_client_key_gets_nothing_and_is_logged(keys, caplog):
    caplog.set_level(logging.WARNING, logger="fer_swarm.security")
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        stranger = Client(ctx, b.frontend, curve=curve(keys, "stranger"))
        try:
            stranger.send(p.Hello())
            stranger.job(1, deadline_ms=100)
            assert stranger.recv(1.0) is None
            fp = security.fingerprint(security.load_public(keys / "all" / "stranger.key"))
            assert wait_for(lambda: any(fp in r.getMessage() for r in caplog.records), 3)
            assert b.scheduler.counters.received == 0
        finally:
            stranger.close()
            b.stop()


def test_worker_with_unknown_key_is_never_registered(keys, caplog):
    caplog.set_level(logging.WARNING, logger="fer_swarm.security")
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        rogue = WorkerThread(ctx, b.backend, secret_key=keys / "all" / "rogue-pi.key_secret",
                             broker_key=keys / "all" / "broker.key")
        try:
            fp = security.fingerprint(security.load_public(keys / "all" / "rogue-pi.key"))
            assert wait_for(lambda: any(fp in r.getMessage() for r in caplog.records), 3)
            assert not b.scheduler.workers
        finally:
            rogue.stop()
            b.stop()


def test_client_key_is_not_a_worker_key(keys):
    """The allow-lists are separate: a client's key cannot register a worker."""
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        w = WorkerThread(ctx, b.backend, secret_key=keys / "all" / "headset.key_secret", broker_key=keys / "all" / "broker.key")
        try:
            assert not wait_for(lambda: b.scheduler.workers, 1.0)
        finally:
            w.stop()
            b.stop()


def test_plaintext_against_curve_broker_gets_nothing(keys):
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        plain = Client(ctx, b.frontend)
        try:
            plain.send(p.Hello())
            plain.job(1, deadline_ms=100)
            assert plain.recv(1.0) is None
            assert b.scheduler.counters.received == 0
        finally:
            plain.close()
            b.stop()


def test_secret_key_file_errors_at_start_up(keys, tmp_path):
    secret = keys / "all" / "pi-1.key_secret"
    base = dict(broker="tcp://10.1.2.3:5556", broker_key=keys / "all" / "broker.key")
    os.chmod(secret, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        Worker(WorkerSettings(secret_key=secret, **base))
    os.chmod(secret, 0o600)
    with pytest.raises(ConfigError, match="not found"):
        Worker(WorkerSettings(secret_key=tmp_path / "nope.key_secret", **base))
    bad = tmp_path / "bad.key_secret"
    bad.write_text('metadata\ncurve\n    public-key = "short"\n    secret-key = "also short"\n')
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="malformed"):
        Worker(WorkerSettings(secret_key=bad, **base))
    public_only = tmp_path / "pub.key_secret"
    public_only.write_bytes((keys / "all" / "pi-1.key").read_bytes())
    os.chmod(public_only, 0o600)
    with pytest.raises(ConfigError, match="no secret-key"):
        Worker(WorkerSettings(secret_key=public_only, **base))
    with pytest.raises(ConfigError, match="both"):
        Worker(WorkerSettings(secret_key=secret, broker="tcp://10.1.2.3:5556"))


def test_generated_secret_key_is_owner_only_and_never_overwritten(tmp_path):
    public, secret = security.generate("pi-9", tmp_path)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    assert security.load_secret(secret).public == security.load_public(public)
    with pytest.raises(ConfigError, match="already exists"):
        security.generate("pi-9", tmp_path)


def test_plaintext_off_loopback_needs_insecure(keys):
    with pytest.raises(ConfigError, match="--insecure"):
        from fer_swarm.broker import Broker

        Broker(BrokerSettings(frontend="tcp://*:0", backend="tcp://127.0.0.1:0"))
    with pytest.raises(ConfigError, match="--insecure"):
        Worker(WorkerSettings(broker="tcp://192.0.2.1:5556"))
    assert security.is_local("tcp://127.0.0.1:5555") and security.is_local("ipc:///tmp/x") and security.is_local("tcp://[::1]:1")
    assert not security.is_local("tcp://*:5555") and not security.is_local("tcp://pi.local:5556")
    # Decided by parsing the address, not by its first characters.
    assert security.is_local("tcp://localhost:5555") and security.is_local("tcp://127.8.9.10:5555")
    assert not security.is_local("tcp://127.0.0.1.example.com:5555") and not security.is_local("tcp://1270.0.0.1:5")
    assert not security.is_local("tcp://[::2]:5555") and not security.is_local("tcp://10.0.0.1:5555")


def test_cli_key_errors_are_one_line(keys):
    secret = keys / "all" / "broker.key_secret"
    os.chmod(secret, 0o644)
    res = run_cli("broker", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0", "--secret-key",
                  str(secret), "--client-keys", str(keys / "clients"), "--worker-keys", str(keys / "workers"), timeout=60)
    assert res.returncode == 2 and len(error_lines(res.stderr)) == 1 and "chmod 600" in res.stderr
    res = run_cli("keys", "generate", "x", "--dir", str(keys / "all"), timeout=60)
    assert res.returncode == 0 and (keys / "all" / "x.key_secret").exists()
