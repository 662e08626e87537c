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


# ---------------------------------------------------------------- errors an operator can act on (issue 12.4)


def edge_client(ctx, endpoint, curve=None):
    from fer_swarm.edge.client import SwarmClient

    return SwarmClient(ctx, endpoint, connect_timeout_s=30, curve=curve)


@pytest.mark.parametrize("who, broker_key, expect", [
    ("stranger", "broker", "refused this client's key"),
    ("headset", "stranger", "probably not this broker's"),
    (None, None, "requires CURVE encryption"),
])
def test_edge_connect_says_which_key_problem_it_is_at_once(keys, who, broker_key, expect):
    """Each is raised from the handshake itself, not after the 30 s connect timeout ("no broker answered")."""
    from fer_swarm.errors import TransportError

    curve = None
    if who:
        curve = (security.load_secret(keys / "all" / f"{who}.key_secret"),
                 security.load_public(keys / "all" / f"{broker_key}.key"))
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        try:
            with edge_client(ctx, b.frontend, curve) as client, pytest.raises(TransportError) as raised:
                client.connect()
        finally:
            b.stop()
    message = str(raised.value)
    assert expect in message and not message.startswith("no broker answered"), message
    if who == "stranger":
        assert curve[0].fingerprint in message and "ZAP status 400" in message and "--client-keys" in message


def test_curve_client_against_a_plaintext_broker_is_told_so(keys):
    from fer_swarm.errors import TransportError

    with zmq_context() as ctx:
        b = BrokerThread(ctx)
        try:
            with edge_client(ctx, b.frontend, curve(keys, "headset")) as client:
                with pytest.raises(TransportError, match="does not use CURVE"):
                    client.connect()
        finally:
            b.stop()


def test_a_worker_with_a_refused_key_says_so_every_retry_not_broker_silent(keys, caplog):
    caplog.set_level(logging.INFO)
    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        rogue = WorkerThread(ctx, b.backend, secret_key=keys / "all" / "rogue-pi.key_secret",
                             broker_key=keys / "all" / "broker.key", reconnect_initial_s=0.05, reconnect_max_s=0.2)
        try:
            refused = lambda: [r for r in caplog.records if "refused this worker's key" in r.getMessage()]  # noqa: E731
            assert wait_for(lambda: len(refused()) >= 3, 20)
        finally:
            rogue.stop()
            b.stop()
    assert all(r.levelno == logging.ERROR for r in refused())
    fp = security.fingerprint(security.load_public(keys / "all" / "rogue-pi.key"))
    assert fp in refused()[0].getMessage()
    assert not any("broker silent" in r.getMessage() for r in caplog.records)
    assert rogue.worker.registrations == 0


def test_an_endpoint_without_its_scheme_gets_did_you_mean(keys):
    from fer_swarm.broker import Broker
    from fer_swarm.config import EdgeSettings

    with pytest.raises(ConfigError, match=r"did you mean tcp://localhost:5555\?"):
        Worker(WorkerSettings(broker="localhost:5555"))
    with pytest.raises(ConfigError, match=r"did you mean tcp://localhost:5555\?"):
        security.client_security(EdgeSettings(broker="5555"), "5555")
    # Checked before the encryption rule, on the broker's endpoints too.
    with pytest.raises(ConfigError, match=r"frontend '5555' names no transport: did you mean tcp://127.0.0.1:5555"):
        Broker(BrokerSettings(frontend="5555", backend="tcp://127.0.0.1:0"))
    with pytest.raises(ConfigError, match=r"did you mean tcp://pi.local:5556\?"):
        Broker(BrokerSettings(frontend="tcp://127.0.0.1:0", backend="pi.local:5556"))
    with pytest.raises(ConfigError, match="unknown transport 'udp'"):
        Worker(WorkerSettings(broker="udp://10.0.0.1:5556"))
    security.check_endpoint("tcp://10.0.0.1:5556", "broker")  # well-formed: no error
    security.check_endpoint("ipc:///tmp/fer-swarm", "broker")
    res = run_cli("worker", "--broker", "localhost:5556", timeout=60)
    assert res.returncode == 2 and error_lines(res.stderr) == [
        "error: broker 'localhost:5556' names no transport: did you mean tcp://localhost:5556?"]


def test_an_empty_allow_list_warns(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fer_swarm.security")
    (tmp_path / "clients").mkdir()
    security.AllowList(security.CLIENTS_DOMAIN, tmp_path / "clients")
    [record] = [r for r in caplog.records if "no allowed clients keys" in r.getMessage()]
    assert record.levelno == logging.WARNING and "every client will be refused" in record.getMessage()


def test_a_public_key_given_as_the_secret_key_says_which_file_to_give(keys):
    public = keys / "all" / "pi-1.key"
    os.chmod(public, 0o644)  # as a public key file usually is: not "readable by others" first
    with pytest.raises(ConfigError, match=r"this is a public key.*give the pi-1\.key_secret file"):
        security.load_secret(public)


def test_the_broker_logs_a_refused_key_with_its_fingerprint_and_the_folder(keys, caplog):
    caplog.set_level(logging.WARNING, logger="fer_swarm.security")
    allow = security.AllowList(security.WORKERS_DOMAIN, keys / "workers")
    stranger = security.load_public(keys / "all" / "stranger.key")
    assert not allow.callback("workers", stranger) and not allow.callback("workers", stranger)
    assert allow.callback("workers", security.load_public(keys / "all" / "pi-1.key"))
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]  # once while recent
    assert security.fingerprint(stranger) in record.getMessage() and str(keys / "workers") in record.getMessage()


@pytest.mark.parametrize("who, broker_key, expect", [
    ("headset", "broker", None),
    ("stranger", "broker", "refused this client's key"),
    ("headset", "stranger", "probably not this broker's"),
])
def test_status_says_which_key_problem_it_is(keys, who, broker_key, expect):
    from fer_swarm.config import StatusSettings
    from fer_swarm.errors import TransportError
    from fer_swarm.status import StatusClient

    with zmq_context() as ctx:
        b = secure_broker(ctx, keys)
        try:
            settings = StatusSettings(broker=b.frontend, timeout_s=20, secret_key=keys / "all" / f"{who}.key_secret",
                                      broker_key=keys / "all" / f"{broker_key}.key")
            with StatusClient(settings, ctx) as client:
                if expect is None:
                    assert client.fetch()["workers"] == []
                else:
                    with pytest.raises(TransportError, match=expect):
                        client.fetch()
        finally:
            b.stop()
