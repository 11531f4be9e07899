"""ZeroMQ CURVE keys and the ZAP handler that decides who may connect to a peer.

A mesh with keys runs every peer link and every client endpoint over CURVE
(authenticated, encrypted). Keys are Z85 text (40 characters, what
``zmq.curve_keypair`` makes). A key setting holds either that text or the path of a
key file: the ZPL certificate format that pyzmq's ``zmq.auth`` writes
(``public-key = "..."`` / ``secret-key = "..."`` under ``curve``), or a file holding
the bare 40-character key.

Who connects is decided by our own ZAP handler (RFC 27) on
``inproc://zeromq.zap.01`` of the socket's context, not by ``zmq.auth``: one handler
serves every socket of a context (a ``LocalMesh`` runs several peers in one
process), each socket under a ZAP domain of its own with its own allowed keys, and
the handler answers with a user id (``peer:K`` for peer K's key) that every received
message carries as ``User-Id`` metadata. The transport takes the sending peer from
that, not from the routing id the other side announces: libzmq puts the *server*
socket's own routing id in the ZAP request's identity frame, so the connecting
routing id can not be checked there.

Why above ~500 lines: keys, key files, the client key registry and the ZAP handler are
one trust decision (who may connect, and as whom), kept in one place to be read as one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
import zmq.asyncio
from zmq.utils import z85

from .errors import ConfigError
from .logutil import ThrottledLog

__all__ = [
    "ClientKeys",
    "Keypair",
    "ZapPolicy",
    "generate_keypair",
    "read_key",
    "register_zap",
    "write_key_file",
]

log = logging.getLogger("statefun_mesh.security")

KEY_CHARS: Final = 40
ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
#: the user id a connection with an allowed client key gets
CLIENT_USER: Final = "client"


@dataclass(frozen=True, slots=True)
class Keypair:
    """A CURVE key pair as Z85 text."""

    public: str
    secret: str


def generate_keypair() -> Keypair:
    """A new random CURVE key pair."""
    public, secret = zmq.curve_keypair()
    return Keypair(public.decode("ascii"), secret.decode("ascii"))


def public_of(secret: str) -> str:
    """The public key that belongs to ``secret``."""
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


def _is_key_text(value: str) -> bool:
    if len(value) != KEY_CHARS:
        return False
    try:
        return len(z85.decode(value.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError, IndexError):
        return False


def is_key_text(value: str) -> bool:
    """Whether ``value`` is a 40-character Z85 key (rather than a key file path)."""
    return _is_key_text(value) and not os.path.exists(value)


def _parse_key_file(text: str, secret: bool) -> str | None:
    bare = text.strip()
    if _is_key_text(bare):
        return bare
    want = "secret-key" if secret else "public-key"
    for line in text.splitlines():
        name, sep, rest = line.strip().partition("=")
        if sep and name.strip() == want:
            value = rest.strip().strip('"').strip("'")
            return value if _is_key_text(value) else None
    return None


def read_key(value: str, *, secret: bool, source: str | None = None, key: str | None = None) -> str:
    """Read a key setting: Z85 key text, or a key file path.

    Returns:
        the key as 40 characters of Z85 text.

    Raises:
        ConfigError: the value is neither, or the file is missing, unreadable or holds
            no such key; the message names the setting and the file.
    """
    what = "secret" if secret else "public"
    if is_key_text(value):
        return value
    if not value:
        raise ConfigError(
            f"expected a {what} key (40 characters of Z85) or a key file path, got ''", source=source, key=key
        )
    if len(value) == KEY_CHARS and os.sep not in value:
        raise ConfigError(
            f"{value[:4]}...: not a valid Z85 {what} key (40 characters from the Z85 alphabet, "
            "as `statefun-mesh keys generate` prints) and no such key file",
            source=source,
            key=key,
        )
    try:
        with open(value, encoding="utf-8") as fh:
            text = fh.read(64 * 1024)
    except FileNotFoundError:
        raise ConfigError(
            f"key file {value} does not exist (give a 40-character Z85 key or the path of a key file "
            "made by `statefun-mesh keys generate`)",
            source=source,
            key=key,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read key file {value}: {exc}", source=source, key=key) from exc
    found = _parse_key_file(text, secret)
    if found is None:
        raise ConfigError(
            f'key file {value} holds no valid {what} key (expected a line {what}-key = "<40 '
            'characters of Z85>" or the bare key)',
            source=source,
            key=key,
        )
    return found


def _write_private(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_key_file(base: str, pair: Keypair, comment: str = "") -> tuple[str, str]:
    """Write ``<base>.key`` (public, mode 0644) and ``<base>.key_secret`` (both keys, mode 0600)
    in the ZPL certificate format ``zmq.auth`` reads too.

    Returns:
        (public key file, secret key file)
    """
    head = f"#   {comment}\n" if comment else ""
    public_path, secret_path = base + ".key", base + ".key_secret"
    _write_private(
        public_path, f'{head}#   public key, safe to share\ncurve\n    public-key = "{pair.public}"\n', 0o644
    )
    _write_private(
        secret_path,
        f"{head}#   SECRET: keep private (mode 0600)\ncurve\n    public-key = "
        f'"{pair.public}"\n    secret-key = "{pair.secret}"\n',
        0o600,
    )
    return public_path, secret_path


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a :class:`~statefun_mesh.MeshClient` needs to talk to a mesh with keys.

    Attributes:
        public: the client's public key (listed in the mesh's ``client_keys``).
        secret: the client's secret key.
        server_keys: client endpoint -> the public key of the peer serving it. An
            endpoint not listed takes the key its peer gave in ``info`` to another,
            already authenticated connection (how ``egress`` and ``status`` reach every
            peer knowing only the first).
    """

    public: str
    secret: str
    server_keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (("public", self.public), ("secret", self.secret), *self.server_keys.items()):
            if not _is_key_text(value):
                raise ConfigError(f"not a 40-character Z85 CURVE key: {value[:4]!r}...", key=name)
        if public_of(self.secret) != self.public:
            raise ConfigError("the public key does not belong to the secret key", key="public")

    @classmethod
    def load(cls, path: str) -> ClientKeys:
        """Read a client key file (``statefun-mesh keys generate --client`` or ``run`` writes one).

        Raises:
            ConfigError: the file is missing, unreadable or malformed (naming it).
        """
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10: the same parser as the tomli package (a dependency there)
            import tomli as tomllib

        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"client key file {path} does not exist", key="client_key") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read client key file {path}: {exc}", key="client_key") from exc
        servers = data.get("server_keys", {})
        if not isinstance(servers, dict) or not all(isinstance(v, str) for v in servers.values()):
            raise ConfigError('expected a table endpoint = "<public key>"', source=path, key="server_keys")
        for name in ("public_key", "secret_key"):
            if not isinstance(data.get(name), str):
                raise ConfigError("missing or not a string", source=path, key=name)
        try:
            return cls(data["public_key"], data["secret_key"], dict(servers))
        except ConfigError as exc:
            raise ConfigError(str(exc), source=path) from None

    def dump(self) -> str:
        """The client key file's text (TOML)."""
        lines = [
            "# statefun-mesh client key: SECRET, keep private (mode 0600)",
            f'public_key = "{self.public}"',
            f'secret_key = "{self.secret}"',
            "",
            "[server_keys]",
        ]
        lines += [f'"{ep}" = "{key}"' for ep, key in self.server_keys.items()]
        return "\n".join(lines) + "\n"

    def save(self, path: str) -> None:
        """Write the client key file, mode 0600."""
        _write_private(path, self.dump(), 0o600)

    def server_key(self, endpoint: str) -> str | None:
        """The public key of the peer at ``endpoint``, if known."""
        return self.server_keys.get(endpoint)


def ensure_keypair(base: str, comment: str = "") -> Keypair:
    """The key pair in ``<base>.key_secret``, made (with ``<base>.key``) if there is none yet."""
    path = base + ".key_secret"
    if os.path.exists(path):
        secret = read_key(path, secret=True, key=os.path.basename(path))
        return Keypair(public_of(secret), secret)
    pair = generate_keypair()
    write_key_file(base, pair, comment)
    return pair


ENV_CLIENT_KEY: Final = "STATEFUN_MESH_CLIENT_KEY"


def registry_path(endpoint: str) -> str:
    """Where ``statefun-mesh run`` leaves the client key file for the mesh it serves at
    ``endpoint``, for clients of this user on this machine to find
    (``$XDG_RUNTIME_DIR/statefun-mesh/client-keys/``, else ``~/.cache/statefun-mesh/client-keys/``)."""
    import re

    root = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", endpoint) + ".toml"
    return os.path.join(root, "statefun-mesh", "client-keys", name)


def register_client_keys(endpoint: str, keys: ClientKeys) -> str:
    """Leave ``keys`` where :func:`find_client_keys` looks for ``endpoint`` (mode 0600, directory 0700)."""
    path = registry_path(endpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    keys.save(path)
    # whose copy it is: a run that was killed cannot remove its copy, and a later mesh on the
    # same endpoint (a reused port) must not be approached with a dead run's keys
    with open(path + ".pid", "w") as fh:
        fh.write(str(os.getpid()))
    return path


def _stale(path: str) -> bool:
    """Whether the run that registered ``path`` is gone (its copies are then removed)."""
    try:
        with open(path + ".pid") as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return False  # no owner recorded: keep the copy
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        pass
    except PermissionError:
        return False  # alive, another user's
    for stale in (path, path + ".pid"):
        try:
            os.unlink(stale)
        except OSError:
            pass
    return True


def find_client_keys(endpoint: str) -> ClientKeys | None:
    """The client keys for ``endpoint``, when none are given: the file ``$STATEFUN_MESH_CLIENT_KEY``
    names, else the one ``statefun-mesh run`` registered for this endpoint; ``None``: none
    (plaintext). A file that does not list ``endpoint`` among its ``server_keys`` is not used.

    Raises:
        ConfigError: ``$STATEFUN_MESH_CLIENT_KEY`` names a missing or malformed file.
    """
    env = os.environ.get(ENV_CLIENT_KEY)
    if env:
        keys = ClientKeys.load(env)
        if keys.server_key(endpoint) is not None:
            return keys
    path = registry_path(endpoint)
    if not os.path.exists(path) or _stale(path):
        return None
    try:
        keys = ClientKeys.load(path)
    except ConfigError as exc:
        log.warning("ignoring the client key file %s: %s", path, exc)
        return None
    return keys if keys.server_key(endpoint) is not None else None


# -- the ZAP handler ------------------------------------------------------------------------


@dataclass(slots=True)
class ZapPolicy:
    """Who a server socket admits.

    Attributes:
        name: for log lines ("peer 0's peer endpoint").
        users: allowed public key (Z85) -> the user id its connections get.
        any_key: admit every key (as ``CLIENT_USER``): CURVE still encrypts.
        on_refused: called for each refused connection.
    """

    name: str
    users: dict[str, str]
    any_key: bool = False
    on_refused: Callable[[str, str], None] | None = None
    refused: int = 0


class _ZapHandler:
    """The one ZAP responder of a ZeroMQ context, serving every registered domain."""

    def __init__(self, ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket) -> None:
        self.ctx = ctx
        self.domains: dict[str, ZapPolicy] = {}
        self.sock = sock
        self.tlog = ThrottledLog(log)
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._serve(), name="statefun-mesh ZAP handler")

    async def _serve(self) -> None:
        while True:
            try:
                parts = await self.sock.recv_multipart()
            except zmq.ZMQError:
                return
            try:
                reply = self.decide(parts)
            except Exception:  # never let one odd request stop authentication
                log.exception("ZAP handler: a request failed")
                continue
            if reply is not None:
                self.sock.send_multipart(reply)

    def decide(self, parts: list[bytes]) -> list[bytes] | None:
        # ROUTER envelope: [routing id, b"", version, request id, domain, address, identity, mechanism, creds...]
        try:
            sep = parts.index(b"")
        except ValueError:
            return None
        env, req = parts[: sep + 1], parts[sep + 1 :]
        if len(req) < 6:
            return None
        version, request_id, domain, address, _identity, mechanism = req[:6]

        def answer(code: bytes, text: str, user: str = "") -> list[bytes]:
            return [*env, version, request_id, code, text.encode(), user.encode(), b""]

        policy = self.domains.get(domain.decode("utf-8", "replace"))
        who = address.decode("utf-8", "replace")
        if policy is None:
            self.tlog.error(
                "zap unknown domain",
                "ZAP handler: a connection from %s asked for unknown domain %r; refused",
                who,
                domain[:64],
            )
            return answer(b"400", "unknown domain")
        if mechanism != b"CURVE" or len(req) < 7 or len(req[6]) != 32:
            return self._refuse(policy, who, f"mechanism {mechanism[:16]!r} instead of CURVE", answer)
        key = z85.encode(req[6]).decode("ascii")
        user = policy.users.get(key)
        if user is None and policy.any_key:
            user = CLIENT_USER
        if user is None:
            return self._refuse(policy, who, f"key {key[:8]}... is not allowed", answer)
        return answer(b"200", "OK", user)

    def _refuse(self, policy: ZapPolicy, who: str, why: str, answer: Any) -> list[bytes]:
        policy.refused += 1
        self.tlog.warning(
            f"refused connections to {policy.name}",
            "refused a connection to %s from %s: %s (refused so far: %d)",
            policy.name,
            who,
            why,
            policy.refused,
        )
        if policy.on_refused is not None:
            policy.on_refused(who, why)
        return answer(b"400", why)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.task.cancel()
        self.sock.close(0)


_HANDLERS: dict[int, _ZapHandler] = {}
_LOCKS: dict[tuple[int, int], asyncio.Lock] = {}


async def _bind_zap(ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    for attempt in range(100):
        try:
            sock.bind(ZAP_ENDPOINT)
            return sock
        except zmq.ZMQError as exc:
            # a handler closed a moment ago: libzmq releases the inproc name asynchronously
            if exc.errno != zmq.EADDRINUSE or attempt == 99:
                sock.close(0)
                raise
            await asyncio.sleep(0.01)
    raise AssertionError("unreachable")  # pragma: no cover


async def register_zap(ctx: zmq.asyncio.Context, domain: str, policy: ZapPolicy) -> Callable[[], None]:
    """Admit connections to sockets with ZAP domain ``domain`` by ``policy``.

    The context's ZAP handler is started at the first registration; it must run before
    a CURVE server socket binds (libzmq admits every key when no handler answers).

    Returns:
        a function that unregisters the domain (and stops the handler after the last).
    """
    loop = asyncio.get_running_loop()
    lock = _LOCKS.get((id(ctx), id(loop)))
    if lock is None:
        lock = _LOCKS[(id(ctx), id(loop))] = asyncio.Lock()
    async with lock:  # peers of one LocalMesh start together: one of them binds the handler
        handler = _HANDLERS.get(id(ctx))
        if handler is not None and (handler.ctx is not ctx or handler.task.done() or handler.loop is not loop):
            del _HANDLERS[id(ctx)]  # left by a closed event loop or context
            handler.close()
            handler = None
        if handler is None:
            handler = _HANDLERS[id(ctx)] = _ZapHandler(ctx, await _bind_zap(ctx))
    if domain in handler.domains:
        raise ValueError(f"ZAP domain {domain!r} is registered already")
    handler.domains[domain] = policy
    h = handler

    def unregister() -> None:
        h.domains.pop(domain, None)
        if not h.domains and _HANDLERS.get(id(ctx)) is h:
            del _HANDLERS[id(ctx)]
            h.close()

    return unregister


def flush_zap_logs(ctx: zmq.asyncio.Context) -> None:
    """Write the summaries of throttled refusal lines (a peer calls it from its heartbeat loop)."""
    handler = _HANDLERS.get(id(ctx))
    if handler is not None:
        handler.tlog.flush()


_HANDSHAKE_FAILURES: Final = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


def watch_handshakes(sock: zmq.Socket[Any], policy: ZapPolicy) -> asyncio.Task[None]:
    """Count and log connections to ``sock`` that fail the handshake before the ZAP
    handler sees them (no CURVE, another mechanism, garbage): refused too.

    Returns:
        the watching task; cancel it before closing ``sock``.
    """
    from zmq.utils.monitor import parse_monitor_message

    # a zmq.asyncio PAIR whatever the class of ``sock``: it is made by the socket's context
    monitor: zmq.asyncio.Socket = sock.get_monitor_socket(_HANDSHAKE_FAILURES)  # type: ignore[assignment]
    tlog = ThrottledLog(log)

    async def watch() -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                policy.refused += 1
                who = event.get("endpoint", b"")
                tlog.warning(
                    f"failed handshakes at {policy.name}",
                    "refused a connection to %s (%r): its "
                    "handshake failed (no CURVE, or not a peer or client of this mesh; refused so far: %d)",
                    policy.name,
                    who,
                    policy.refused,
                )
        except (zmq.ZMQError, asyncio.CancelledError):
            pass
        finally:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(0)

    return asyncio.get_running_loop().create_task(watch(), name=f"statefun-mesh handshake watch {policy.name}")


def curve_server(sock: zmq.Socket[Any], secret: str, domain: str) -> None:
    """Make ``sock`` a CURVE server with ``secret``, authenticated in ZAP ``domain`` (before bind)."""
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode("ascii"))


def curve_client(sock: zmq.Socket[Any], pair: Keypair, server_key: str) -> None:
    """Make ``sock`` a CURVE client of the server with public key ``server_key`` (before connect)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode("ascii"))
    sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode("ascii"))
