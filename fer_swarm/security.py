"""CurveZMQ keys, the broker's allow-lists, and when security must be on.

Face crops are biometric data, so every link (edge-broker, worker-broker) is
encrypted and authenticated with CURVE when it leaves the machine. Keys are
the files ``zmq.auth`` reads: ``NAME.key`` (public, shareable) and
``NAME.key_secret`` (secret, owner-only). The broker holds one folder of
allowed client public keys and one of allowed worker public keys and checks
every handshake against them through ZAP; without a ZAP handler libzmq's
CURVE server would accept any client key, so the broker never runs CURVE
without one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
CLIENTS_DOMAIN = "clients"
WORKERS_DOMAIN = "workers"


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def fingerprint(public_z85: bytes) -> str:
    """A short, stable name for a public key, for logs: the first 16 hex digits of its SHA-256."""
    try:
        raw = zmq.utils.z85.decode(public_z85)
    except (ValueError, TypeError):
        raw = bytes(public_z85)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return ":".join(digest[i:i + 4] for i in range(0, 16, 4))


def generate(name: str, directory: Path) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) into ``directory``; never overwrite."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} already exists: remove it first or choose another name")
    public, secret = zmq.curve_keypair()
    body = "# fer-swarm CurveZMQ key ({kind}) for {name}\n# fingerprint {fp}\nmetadata\ncurve\n    public-key = \"{pub}\"\n"
    fp = fingerprint(public)
    public_path.write_text(body.format(kind="public", name=name, fp=fp, pub=public.decode()))
    # Created owner-only from the first byte: a chmod after writing would leave a window.
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body.format(kind="SECRET, keep private", name=name, fp=fp, pub=public.decode()))
        f.write(f'    secret-key = "{secret.decode()}"\n')
    return public_path, secret_path


def load_secret(path: Path) -> KeyPair:
    """A key pair from a NAME.key_secret file that only its owner can read; ConfigError otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: secret key file not found (create one with: fer-swarm keys generate NAME)") from None
    # Read before judging the mode: a public key file is world-readable by design, and the
    # operator who gave one needs to hear which file to give, not to chmod it.
    public, secret = _read_cert(path)
    if secret is None:
        name = path.name.removesuffix(PUBLIC_SUFFIX)
        raise ConfigError(f"{path}: this is a public key, with no secret-key in it; give the "
                          f"{name}{SECRET_SUFFIX} file made with it")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: secret key is readable by others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    return KeyPair(public, secret)


def load_public(path: Path) -> bytes:
    public, _ = _read_cert(Path(path))
    return public


def _read_cert(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"{path}: key file not found")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed key file ({e})") from None
    for what, key in (("public-key", public), ("secret-key", secret)):
        if key is None:
            continue
        try:
            if len(key) != 40 or len(zmq.utils.z85.decode(key)) != 32:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{path}: malformed {what} (expected 40 Z85 characters)") from None
    if public is None:
        raise ConfigError(f"{path}: malformed key file (no public-key)")
    return public, secret


class AllowList:
    """The public keys in one folder; a ZAP credentials provider that logs every refusal by fingerprint."""

    def __init__(self, domain: str, directory: Path):
        self.domain = domain
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"{directory}: allowed {domain} key folder not found")
        self.keys = {load_public(p) for p in sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}"))}
        self._recently_refused: OrderedDict[bytes, None] = OrderedDict()
        if self.keys:
            log.info("%d allowed %s key(s) in %s", len(self.keys), domain, directory)
        else:
            log.warning("no allowed %s keys (*%s) in %s: every %s will be refused until its public key is copied "
                        "there and the broker restarted", domain, PUBLIC_SUFFIX, directory, domain.rstrip("s"))

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        # Log each refused key once while it is recent, so a flood of handshakes cannot flood the log.
        if key not in self._recently_refused:
            log.warning("refused %s with unknown CURVE key %s (not in %s)", self.domain.rstrip("s"), fingerprint(key),
                        self.directory)
            self._recently_refused[key] = None
            if len(self._recently_refused) > 1024:
                self._recently_refused.popitem(last=False)
        else:
            self._recently_refused.move_to_end(key)
        return False


def start_authenticator(ctx: zmq.Context, clients: AllowList, workers: AllowList) -> ThreadAuthenticator:
    """Run the ZAP handler for both domains in a thread of its own (stop() it when done)."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    auth.configure_curve_callback(CLIENTS_DOMAIN, credentials_provider=clients)
    auth.configure_curve_callback(WORKERS_DOMAIN, credentials_provider=workers)
    return auth


def make_server(sock: zmq.Socket, keys: KeyPair, domain: str) -> None:
    sock.curve_server = True
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.zap_domain = domain.encode()


def make_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = server_public


# Transports a fer-swarm endpoint may name (libzmq's; tcp is the one across machines).
TRANSPORTS = ("tcp", "ipc", "inproc")


def check_endpoint(endpoint: str, setting: str, *, bind: bool = False) -> None:
    """ConfigError, with the likely fix, for an endpoint that names no transport (``localhost:5555``, ``5555``).

    Checked before the encryption rule, whose error would otherwise send the
    operator after keys when the address only lacks its ``tcp://``.
    """
    scheme, sep, rest = endpoint.partition("://")
    if sep and scheme in TRANSPORTS:
        if rest:
            return
        raise ConfigError(f"{setting} {endpoint!r} names no address: use {scheme}://HOST:PORT")
    if sep:
        raise ConfigError(f"{setting} {endpoint!r}: unknown transport {scheme!r}; use tcp://HOST:PORT "
                          "(or ipc://PATH on one machine)")
    if endpoint.isdigit():
        guess = (f"tcp://127.0.0.1:{endpoint} (this machine only) or tcp://*:{endpoint} (every interface)" if bind
                 else f"tcp://localhost:{endpoint}")
    elif ":" in endpoint:
        guess = f"tcp://{endpoint}"
    else:
        guess = "tcp://HOST:PORT"
    raise ConfigError(f"{setting} {endpoint!r} names no transport: did you mean {guess}?")


def is_local(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: loopback TCP, ipc:// and inproc://.

    The host is parsed as an address, never matched by prefix: ``127.0.0.1.example.com``
    is a name anyone could point anywhere, so it gets encryption like any other.
    """
    url = urlparse(endpoint)
    if url.scheme in ("inproc", "ipc"):
        return True
    host = (url.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BrokerSecurity:
    keys: KeyPair
    clients: AllowList
    workers: AllowList


def broker_security(settings) -> BrokerSecurity | None:
    """CURVE material for the broker, or None for plaintext; ConfigError when the rule is broken.

    The rule: plaintext only on endpoints that never leave this machine,
    unless the operator says --insecure, which is logged as a warning.
    """
    check_endpoint(settings.frontend, "frontend", bind=True)
    check_endpoint(settings.backend, "backend", bind=True)
    given = [settings.secret_key, settings.client_keys, settings.worker_keys]
    if any(given):
        if not all(given):
            raise ConfigError("CURVE needs all three of --secret-key, --client-keys and --worker-keys")
        return BrokerSecurity(
            keys=load_secret(settings.secret_key),
            clients=AllowList(CLIENTS_DOMAIN, settings.client_keys),
            workers=AllowList(WORKERS_DOMAIN, settings.worker_keys),
        )
    exposed = [e for e in (settings.frontend, settings.backend) if not is_local(e)]
    if exposed and not settings.insecure:
        raise ConfigError(
            f"binding {', '.join(exposed)} without encryption would expose face crops to the network: "
            "give --secret-key, --client-keys and --worker-keys (see docs/security.md), "
            "bind to 127.0.0.1, or pass --insecure"
        )
    if exposed:
        log.warning("INSECURE: plaintext on %s; anyone on the network can read and send face crops", ", ".join(exposed))
    return None


def client_security(settings, endpoint: str) -> tuple[KeyPair, bytes] | None:
    """(own key pair, broker public key) for a worker or edge, or None for plaintext; same rule as the broker."""
    check_endpoint(endpoint, "broker")
    if settings.secret_key or settings.broker_key:
        if not (settings.secret_key and settings.broker_key):
            raise ConfigError("CURVE needs both --secret-key and --broker-key")
        return load_secret(settings.secret_key), load_public(settings.broker_key)
    if not is_local(endpoint):
        if not settings.insecure:
            raise ConfigError(
                f"connecting to {endpoint} without encryption would send face crops in the clear: "
                "give --secret-key and --broker-key (see docs/security.md), or pass --insecure"
            )
        log.warning("INSECURE: plaintext to %s", endpoint)
    return None
