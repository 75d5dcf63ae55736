"""CURVE keys and socket security: who may talk to the broker. No broker logic here.

Both broker sockets are CurveZMQ servers; pyzmq's own ZAP handler (zmq.auth's ThreadAuthenticator) admits a
connection only if its public key is in the allowlist of that socket's ZAP domain: clients on the front
(FRONT_DOMAIN), workers on the back (BACK_DOMAIN). The two lists are separate, so a client key cannot
register a worker, nor a worker key submit work.

Keys folder (`rolloutd keys generate`; flags and $ROLLOUTD_KEYS name it), files in zmq.auth's format:

    DIR/broker.key, DIR/broker.key_secret   the broker's pair (broker.key, the public half, goes to every host)
    DIR/worker.key_secret (+ worker.key)    a worker's pair
    DIR/client.key_secret (+ client.key)    a client's pair
    DIR/workers/*.key                       public keys allowed on the back socket (worker.key copied in)
    DIR/clients/*.key                       public keys allowed on the front socket (client.key copied in)

The broker host needs broker.key_secret, workers/ and clients/; a worker host broker.key and
worker.key_secret; a client host broker.key and client.key_secret. Secret files are 0600, DIR 0700. To
admit another key, put its public .key file into workers/ or clients/ and restart the broker: the
allowlists are read when the authenticator starts.

What holds in the pyzmq (27.3) and libzmq (4.3.5) installed here, checked with real sockets by
tests/test_auth.py:

- ZAP is per zmq context: the authenticator answers only for sockets of the context it was started on.
- A CURVE server whose context has no ZAP handler lets every client key in. make_server therefore sets
  ZMQ_ZAP_ENFORCE_DOMAIN (the socket then admits nobody while no handler answers: also after the
  authenticator stops, when a new handshake is refused or, now and then, left hanging on a request the
  closing handler never answers), and refuses a socket whose context has no authenticator from
  start_authenticator.
- configure_curve(domain=..., location=...) keeps one allowlist per domain: a key outside the socket's
  domain's list gets ZAP "400 Unknown key", a socket with a domain nobody configured "400 Unknown domain".
  A refused peer's messages never reach the socket; the denial is logged (DEBUG) by "rolloutd.auth.zap".
  The refused side's socket monitor reports EVENT_HANDSHAKE_FAILED_AUTH with value 400 (a key outside the
  list), EVENT_HANDSHAKE_FAILED_NO_DETAIL (it expects another broker key), EVENT_HANDSHAKE_FAILED_PROTOCOL
  (it has no keys); libzmq then retries the connection, refused each time. Otherwise its sends just wait.
- On success the authenticator answers with the z85 text of the client's public key as the user id;
  libzmq attaches it as the "User-Id" property of every frame of every message from that connection (the
  ROUTER's identity frame included). It is read with Frame.get("User-Id") on frames received with
  copy=False (bytes carry no properties). Without ZAP (the NULL mechanism) the property is absent.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
import weakref

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .errors import InsecureBind, InternalError, RolloutdError

log = logging.getLogger("rolloutd.auth")

FRONT_DOMAIN = "rolloutd-front"  # ZAP domain of the broker's client socket
BACK_DOMAIN = "rolloutd-back"  # ZAP domain of the broker's worker socket
ENV = "ROLLOUTD_KEYS"  # environment variable naming the keys folder

_ROLES = ("client", "worker")
_ALLOWLIST = {FRONT_DOMAIN: "clients", BACK_DOMAIN: "workers"}  # domain -> folder of allowed public keys
# The authenticator running on each context, so that make_server can tell a socket nobody guards.
_running: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class KeyFileError(RolloutdError):
    """A key file is missing, unreadable, or would be overwritten."""

    code = "keys"


def keys_dir(explicit: str | None) -> str | None:
    """The keys folder: the flag if given, else $ROLLOUTD_KEYS, else None (no keys)."""
    d = explicit or os.environ.get(ENV) or None
    return os.path.expanduser(d) if d else None


def generate_keys(directory: str, *, force: bool = False) -> dict[str, str]:
    """Write the broker, worker and client pairs and the two allowlists (layout in the module docstring).

    Returns what was written: "broker", "worker", "client" (secret files), "broker_public", "worker_public",
    "client_public", and the allowlist folders "workers" and "clients". Refuses to replace any existing key
    file unless force (with force, other keys already in the allowlists stay).
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    out = {}
    for name in ("broker", "worker", "client"):
        out[name] = os.path.join(directory, f"{name}.key_secret")
        out[f"{name}_public"] = os.path.join(directory, f"{name}.key")
    out["workers"], out["clients"] = os.path.join(directory, "workers"), os.path.join(directory, "clients")
    copies = {out["worker_public"]: os.path.join(out["workers"], "worker.key"),
              out["client_public"]: os.path.join(out["clients"], "client.key")}
    if not force:
        # All checked before anything is written: a refusal leaves the folder as it was.
        key_files = [v for k, v in out.items() if k not in ("workers", "clients")] + list(copies.values())
        for path in key_files:
            if os.path.exists(path):
                raise KeyFileError(f"{path} exists; pass --force to replace the keys "
                                   "(every host then needs the new files)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # Before any secret is written: create_certificates makes its files with the umask's mode (often
    # world-readable) and they are tightened only after, so the folder is what keeps them private meanwhile.
    os.chmod(directory, 0o700)
    for sub in ("workers", "clients"):
        os.makedirs(out[sub], exist_ok=True)
    for name in ("broker", "worker", "client"):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
    for src, dst in copies.items():
        shutil.copyfile(src, dst)
    return out


def start_authenticator(ctx: zmq.Context, directory: str) -> ThreadAuthenticator:
    """Start pyzmq's ZAP handler on ctx with the CURVE allowlists DIR/clients (front) and DIR/workers (back).

    Call before make_server, on the context of the broker's sockets; the caller stops it (after closing them).
    """
    if _guard(ctx) is not None:
        raise InternalError("an authenticator already runs on this context (libzmq allows one ZAP handler per context)")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("rolloutd.auth.zap"))
    for domain, sub in _ALLOWLIST.items():
        path = os.path.join(directory, sub)
        if not os.path.isdir(path):
            raise KeyFileError(f"{path}: no such folder of allowed public keys (made by `rolloutd keys generate`)")
        # Checked here: configure_curve only logs a folder it cannot read, and the domain then admits nobody.
        allowed = zmq.auth.load_certificates(path)
        if not allowed:
            log.warning("%s holds no *.key file: no %s can connect", path, sub[:-1])
        auth.configure_curve(domain=domain, location=path)
    auth.start()
    # A weak reference: the authenticator holds ctx, and a strong one would keep ctx alive for good.
    _running[ctx] = weakref.ref(auth)
    return auth


def make_server(sock: zmq.Socket, directory: str, domain: str) -> None:
    """Make sock a CURVE server with the broker's pair, admitting only domain's allowlist. Before bind."""
    auth = _guard(sock.context)
    if auth is None:
        # Without a ZAP handler libzmq would let any client key in (ZAP_ENFORCE_DOMAIN below shuts that
        # too, but as silent refusals of every peer): say what is wrong instead.
        raise InternalError("make_server: call start_authenticator on this socket's context first")
    if domain not in auth.certs:
        raise InternalError(f"make_server: no allowlist for ZAP domain {domain!r} (known: {sorted(auth.certs)})")
    public, secret = _load(os.path.join(directory, "broker.key_secret"), secret=True)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    sock.zap_domain = domain.encode()
    # With this set, a connection that no ZAP handler answers is refused rather than admitted: the state
    # after the authenticator stops while the socket still listens. A libzmq built without the option
    # (it is a draft) still has the check above.
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (zmq.ZMQError, AttributeError):
        log.debug("this libzmq has no ZAP_ENFORCE_DOMAIN")


def make_client(sock: zmq.Socket, directory: str, role: str) -> None:
    """Give sock role's pair ("client" or "worker"), and the broker's public key to check the broker by.
    Before connect."""
    if role not in _ROLES:
        raise ValueError(f"role is one of {_ROLES}, not {role!r}")
    public, secret = _load(os.path.join(directory, f"{role}.key_secret"), secret=True)
    server, _ = _load(os.path.join(directory, "broker.key"), secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server


def peer_key(frame: zmq.Frame) -> str | None:
    """The authenticated public key (z85 text) of whoever sent frame (received with copy=False); None without CURVE."""
    if not isinstance(frame, zmq.Frame):
        raise TypeError(f"peer_key needs a zmq.Frame (receive with copy=False), not {type(frame).__name__}")
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: no ZAP handshake on this connection
        return None
    # Only our CURVE domains set it to a key; pyzmq's handler names NULL and PLAIN peers otherwise ("anonymous").
    try:
        return user if len(z85.decode(user)) == 32 else None
    except (ValueError, KeyError):
        return None


def check_bind(address: str, directory: str | None, insecure: bool) -> None:
    """Refuse (InsecureBind) to listen on a non-loopback TCP address without keys, unless insecure (then warn)."""
    if directory is not None or _is_local(address):
        return
    if not insecure:
        raise InsecureBind(
            f"refusing to bind {address} without keys: anyone who can reach it could submit work or register "
            f"as a worker. Run `rolloutd keys generate` and point every process at the keys (--keys DIR or "
            f"${ENV}), or bind 127.0.0.1, or pass --insecure")
    log.warning("!!! INSECURE: %s is open with NO AUTHENTICATION (--insecure): anyone who can reach this port can "
                "submit work and register as a worker. Use `rolloutd keys generate` and --keys instead. !!!", address)


def _is_local(address: str) -> bool:
    """Whether only this machine can reach address: ipc and inproc, or TCP on localhost / 127.0.0.0/8 / ::1."""
    transport, _, rest = address.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False  # other transports (ws, pgm, ...) are judged not local: they need keys too
    host = rest.rsplit(":", 1)[0].strip("[]")  # "*", an interface name, a hostname or an IP
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])  # an IPv6 zone ("%eth0") is not part of the address
    except ValueError:
        return False  # "*", an interface or a hostname: not resolved here, so not trusted as local
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _guard(ctx: zmq.Context) -> ThreadAuthenticator | None:
    """The authenticator start_authenticator started on ctx, if it still runs."""
    ref = _running.get(ctx)
    auth = ref() if ref is not None else None
    return auth if auth is not None and auth.is_alive() else None


def _load(path: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not os.path.exists(path):
        raise KeyFileError(f"{path}: no such key file (made by `rolloutd keys generate`; copy it to this host)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path}: not a key file: {e}") from e
    if secret and secret_key is None:
        raise KeyFileError(f"{path}: holds no secret key (the .key_secret file is needed, not the .key)")
    if secret and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is open to other users (mode %o): chmod 600 it", path, stat.S_IMODE(os.stat(path).st_mode))
    return public, secret_key
