"""Mesh configuration: one frozen dataclass, every setting with a default, loadable from TOML."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the tomli package (a dependency there)
    import tomli as tomllib

from .errors import ConfigError

__all__ = ["MeshConfig", "load_config"]

_SCHEMES = ("tcp://", "ipc://", "inproc://", "memory://")
#: bytes of a frame that are not the message: envelope (generation, credit grant), frame and array
#: headers between peers; the other fields of a client's SEND or REQUEST frame.
FRAME_HEADROOM = 1024
MIN_FRAME_BYTES = 4096


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Settings shared by every peer of a mesh (docs/configuration.md lists them all).

    Attributes:
        functions: ``package.module:attribute`` references to ``StatefulFunctions``
            (used by the command line; embedding code passes the objects).
        state_dir: directory holding each peer's LMDB environment (``peer-<id>/``).
            ``None``: a temporary directory, deleted when a ``LocalMesh`` closes.
        max_parallelism: number of key groups; fixed for the life of the application.
        peers: number of peers.
        endpoints: every peer's peer-to-peer endpoint, indexed by peer id
            (``tcp://host:port``, ``ipc:///path``, ``inproc://name``, ``memory://hub/id``).
            Needed when ``peers > 1``.
        client_endpoints: every peer's endpoint for clients (``MeshClient``); ``""``
            for a peer that takes no clients. Empty: no peer takes network clients.
        max_batch: most messages a peer takes into one batch (one LMDB write).
        inbox_limit: queued messages (local inbox plus unsent outgoing) above which
            client sends wait: the backpressure that bounds memory.
        credit_window: messages one peer may send another before the receiver grants more.
        memory_budget: bytes a peer may hold in queued and in-flight messages (its
            inbox, outgoing buffers, frames held at a checkpoint barrier). Half is for
            the inbox (the rest of it spills to disk), a quarter for outgoing buffers
            (processing waits for credit beyond it), a quarter for held frames; client
            sends wait (and are refused with ``MeshBusyError`` when too many wait)
            while the inbox and outgoing buffers hold more than a quarter.
        max_frame_records: outgoing messages to one peer that trigger an immediate flush.
        linger: seconds a client message may wait to be batched with others before it
            is flushed to its peer (0: at the next turn of the event loop).
        max_frame_bytes: frames above this size are refused by the receiver.
        max_message_bytes: the largest message (its record as framed: value, type
            names, ids) a peer admits; a larger one is refused with
            ``MessageTooLargeError``. ``None``: ``max_frame_bytes - FRAME_HEADROOM``;
            at most that.
        max_request_timeout: the longest timeout, in seconds, a client request may ask for.
        max_pending_requests: client requests a peer holds waiting for their reply, in total.
        max_pending_requests_per_client: ... and per client connection.
        heartbeat_interval: seconds between heartbeats to every other peer.
        heartbeat_timeout: silence after which a peer is reported unavailable.
        egress_retention: records kept per egress and peer; older ones are trimmed.
        dedup_retention: seconds an idempotency key is remembered after its message
            was applied; a resend within this window is not applied again.
        map_size: initial LMDB map size in bytes (it grows by doubling when full).
        max_map_size: the largest LMDB map a peer grows to.
        sync_interval: seconds between fsyncs of the state store (0: fsync every batch).
        blob_store: where checkpoints go (``file:///dir``, a path, ``s3://bucket/prefix``,
            ``memory://name``); empty: no checkpoints (and no exactly-once across crashes).
        checkpoint_interval: seconds between checkpoints.
        checkpoint_timeout: a checkpoint not complete after this long is aborted.
        checkpoint_retention: complete checkpoints kept; older ones and the objects only
            they use are deleted.
        base_every: a peer uploads a full base instead of a delta after this many
            deltas, or ...
        delta_ratio: ... when its deltas since the base add up to more than this
            fraction of the base.
        ingress_sync: fsync the ingress log before acknowledging a client message
            (survives a machine crash, not only a process crash).
        egress_immediate: egresses whose records consumers see as soon as the batch
            that produced them commits, instead of when the checkpoint covering them
            completes. Each record then carries a deterministic ``id``
            (``"<function type>/<id>#<n>"``): after a recovery, records of the rolled-back
            part are produced again with the same ids; consumers deduplicate by id.
        restore: which checkpoint the mesh starts from. ``""`` (default): the latest,
            which must have been taken on this number of peers. ``"latest"`` or a
            checkpoint id: that checkpoint, onto this number of peers (rescaling when
            it was taken on another number); checkpoints newer than an older id are
            deleted. Done once: ``statefun-mesh run`` drops it when the mesh is up.
        local_recovery: keep a local copy of every checkpoint object a peer uploads
            (``<state_dir>/peer-<id>.checkpoints/``) and restore from it when it is
            intact; ``False``: keep none and restore from the blob store only.
        park_after: seconds a batch waits for its ``async`` invocations; one still
            awaiting then is *parked*: the batch commits without it, its address's later
            messages wait behind it, and its effects commit in a later batch.
        block_warning: seconds an invocation may hold the peer's event loop (a sync
            function, or an async one between awaits) before the peer logs a warning
            naming it (0: no watchdog).
        module: a StateFun ``module.yaml`` whose HTTP endpoint components name remote
            functions the peers call over the request-reply protocol (docs/remote.md);
            ``""``: none.
        metrics_endpoints: every peer's HTTP endpoint (``host:port`` or
            ``http://host:port``) serving ``/metrics`` (Prometheus), ``/healthz`` and
            ``/readyz``; ``""`` for a peer that serves none. Empty: no peer serves HTTP.
            Served with ``aiohttp`` and ``prometheus-client`` (dependencies of the package).
        dashboard: peers with a metrics endpoint also serve the web dashboard at ``/``
            (``statefun-mesh run`` turns it on for peer 0).
        peer_keys: every peer's CURVE public key (Z85 text or a key file path), indexed
            by peer id. Set: every ZeroMQ link and client endpoint runs over CURVE and
            admits only these keys (peers) and ``client_keys`` (clients); see
            docs/security.md. Empty: no authentication (plaintext).
        secret_key: this peer's CURVE secret key (Z85 text or a key file path);
            ``{id}`` in it is replaced by the peer id (``keys/peer-{id}.key_secret``).
        client_keys: the client public keys (Z85 text or key file paths) a client
            endpoint admits.
        any_client_key: admit clients with any key on client endpoints (traffic is still
            encrypted; use when clients are not known in advance).
    """

    functions: tuple[str, ...] = ()
    state_dir: str | None = None
    max_parallelism: int = 1024
    peers: int = 1
    endpoints: tuple[str, ...] = ()
    client_endpoints: tuple[str, ...] = ()
    max_batch: int = 1000
    inbox_limit: int = 100_000
    credit_window: int = 20_000
    memory_budget: int = 256 << 20
    max_frame_records: int = 1000
    linger: float = 0.0
    max_frame_bytes: int = 64 << 20
    max_message_bytes: int | None = None
    max_request_timeout: float = 300.0
    max_pending_requests: int = 10_000
    max_pending_requests_per_client: int = 1_000
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    egress_retention: int = 100_000
    dedup_retention: float = 86_400.0
    map_size: int = 1 << 30
    max_map_size: int = 1 << 40
    sync_interval: float = 1.0
    blob_store: str = ""
    checkpoint_interval: float = 5.0
    checkpoint_timeout: float = 60.0
    checkpoint_retention: int = 3
    base_every: int = 20
    delta_ratio: float = 0.5
    ingress_sync: bool = True
    egress_immediate: tuple[str, ...] = ()
    restore: str = ""
    local_recovery: bool = True
    park_after: float = 0.05
    block_warning: float = 1.0
    module: str = ""
    metrics_endpoints: tuple[str, ...] = ()
    dashboard: bool = False
    peer_keys: tuple[str, ...] = ()
    secret_key: str = ""
    client_keys: tuple[str, ...] = ()
    any_client_key: bool = False
    _source: str = field(default="<arguments>", repr=False, compare=False)

    def __post_init__(self) -> None:
        src = self._source

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"expected {expected}, got {getattr(self, key)!r}", source=src, key=key)

        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.type == "int" and (type(value) is not int or value < 1):
                raise bad(f.name, "a positive integer")
            if f.type == "float" and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise bad(f.name, "a finite number >= 0")
        if not 1 <= self.max_parallelism <= 32768:
            raise bad("max_parallelism", "an integer between 1 and 32768")
        if self.peers > self.max_parallelism:
            raise bad("peers", f"at most max_parallelism ({self.max_parallelism}) peers")
        if not isinstance(self.blob_store, str):
            raise bad("blob_store", "a URL string (file://, s3://, memory://) or a path")
        if not isinstance(self.restore, str) or not (self.restore in ("", "latest") or self.restore.isdigit()):
            raise bad("restore", '"latest", a checkpoint id, or "" (the latest checkpoint, same number of peers)')
        if self.restore and not self.blob_store:
            raise bad("restore", "no value: there is no blob_store to restore from")
        if not isinstance(self.ingress_sync, bool):
            raise bad("ingress_sync", "true or false")
        if not isinstance(self.local_recovery, bool):
            raise bad("local_recovery", "true or false")
        if self.blob_store and self.checkpoint_interval <= 0:
            raise bad("checkpoint_interval", "a positive number of seconds")
        if not isinstance(self.module, str):
            raise bad("module", "the path of a StateFun module.yaml")
        if self.state_dir is not None and not isinstance(self.state_dir, str):
            raise bad("state_dir", "a directory path")
        for name in (
            "functions",
            "endpoints",
            "client_endpoints",
            "egress_immediate",
            "peer_keys",
            "client_keys",
            "metrics_endpoints",
        ):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise bad(name, "a list of strings")
        for ref in self.functions:
            if ref.count(":") != 1 or not all(ref.split(":")):
                raise ConfigError(f"expected 'package.module:attribute', got {ref!r}", source=src, key="functions")
        if self.peers > 1 and len(self.endpoints) != self.peers:
            raise bad("endpoints", f"one endpoint per peer ({self.peers})")
        if self.endpoints and len(self.endpoints) != self.peers:
            raise bad("endpoints", f"one endpoint per peer ({self.peers})")
        for ep in self.endpoints:
            if not ep.startswith(_SCHEMES):
                raise ConfigError(
                    f"expected an endpoint URL starting with one of {', '.join(_SCHEMES)}, got {ep!r}",
                    source=src,
                    key="endpoints",
                )
        if len(set(self.endpoints)) != len(self.endpoints):
            raise bad("endpoints", "a distinct endpoint for every peer")
        if self.client_endpoints:
            if len(self.client_endpoints) != self.peers:
                raise bad("client_endpoints", f"one entry per peer ({self.peers}), '' for none")
            for ep in self.client_endpoints:
                if ep and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                    raise ConfigError(
                        f"expected a tcp://, ipc:// or inproc:// URL, got {ep!r}", source=src, key="client_endpoints"
                    )
        if self.metrics_endpoints:
            if len(self.metrics_endpoints) != self.peers:
                raise bad("metrics_endpoints", f"one entry per peer ({self.peers}), '' for none")
            for ep in self.metrics_endpoints:
                if ep:
                    try:
                        parse_http_endpoint(ep)
                    except ValueError as exc:
                        raise ConfigError(str(exc), source=src, key="metrics_endpoints") from None
        if not isinstance(self.dashboard, bool):
            raise bad("dashboard", "true or false")
        if self.max_frame_bytes < MIN_FRAME_BYTES:
            raise bad("max_frame_bytes", f"at least {MIN_FRAME_BYTES} bytes")
        mm = self.max_message_bytes
        if mm is not None and (type(mm) is not int or not 1 <= mm <= self.max_frame_bytes - FRAME_HEADROOM):
            most = self.max_frame_bytes - FRAME_HEADROOM
            raise bad("max_message_bytes", f"a positive integer at most max_frame_bytes - {FRAME_HEADROOM} ({most})")
        if self.max_request_timeout <= 0:
            raise bad("max_request_timeout", "a positive number of seconds")
        if self.memory_budget < 1 << 20:
            raise bad("memory_budget", "at least 1048576 bytes (1 MiB)")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise bad("heartbeat_timeout", f"more than heartbeat_interval ({self.heartbeat_interval})")
        self._check_keys()

    def _check_keys(self) -> None:
        from .security import is_key_text, read_key

        src = self._source
        if not isinstance(self.secret_key, str):
            raise ConfigError("expected a key or key file path string", source=src, key="secret_key")
        if not isinstance(self.any_client_key, bool):
            raise ConfigError("expected true or false", source=src, key="any_client_key")
        for i, k in enumerate(self.peer_keys):
            read_key(k, secret=False, source=src, key=f"peer_keys[{i}]")
        for i, k in enumerate(self.client_keys):
            read_key(k, secret=False, source=src, key=f"client_keys[{i}]")
        if not self.peer_keys:
            for name in ("secret_key", "client_keys", "any_client_key"):
                if getattr(self, name):
                    raise ConfigError(
                        "needs peer_keys (every peer's public key): without them the mesh runs without "
                        "CURVE and this setting would be ignored",
                        source=src,
                        key=name,
                    )
            return
        if len(self.peer_keys) != self.peers:
            raise ConfigError(
                f"expected one public key per peer ({self.peers}), got {len(self.peer_keys)}",
                source=src,
                key="peer_keys",
            )
        if not self.secret_key:
            raise ConfigError(
                "peer_keys are set, so each peer needs its secret key (key text or a key file path, "
                "{id} for the peer id)",
                source=src,
                key="secret_key",
            )
        if "{id}" not in self.secret_key and not is_key_text(self.secret_key) and not os.path.exists(self.secret_key):
            read_key(self.secret_key, secret=True, source=src, key="secret_key")  # raises, naming the file
        if self.client_keys and self.any_client_key:
            raise ConfigError("give client_keys or any_client_key = true, not both", source=src, key="any_client_key")

    @property
    def curve(self) -> bool:
        """Whether links and client endpoints run over CURVE (``peer_keys`` are set)."""
        return bool(self.peer_keys)

    def peer_public_keys(self) -> list[str]:
        """Every peer's public key as Z85 text (``[]`` without CURVE)."""
        from .security import read_key

        return [
            read_key(k, secret=False, source=self._source, key=f"peer_keys[{i}]") for i, k in enumerate(self.peer_keys)
        ]

    def client_public_keys(self) -> list[str]:
        """The admitted client public keys as Z85 text."""
        from .security import read_key

        return [
            read_key(k, secret=False, source=self._source, key=f"client_keys[{i}]")
            for i, k in enumerate(self.client_keys)
        ]

    def keypair(self, peer_id: int) -> Any:
        """Peer ``peer_id``'s CURVE key pair (a :class:`~statefun_mesh.security.Keypair`).

        Raises:
            ConfigError: the secret key is missing or malformed, its file is missing, or it
                does not belong to ``peer_keys[peer_id]``.
        """
        from .security import Keypair, public_of, read_key

        value = self.secret_key.replace("{id}", str(peer_id))
        secret = read_key(value, secret=True, source=self._source, key="secret_key")
        public = read_key(self.peer_keys[peer_id], secret=False, source=self._source, key=f"peer_keys[{peer_id}]")
        if public_of(secret) != public:
            raise ConfigError(
                f"the secret key for peer {peer_id} ({value if secret != value else 'given inline'}) "
                f"does not belong to peer_keys[{peer_id}]: every peer needs its own key pair",
                source=self._source,
                key="secret_key",
            )
        return Keypair(public, secret)

    @property
    def message_limit(self) -> int:
        """The largest message a peer admits: ``max_message_bytes``, or by default
        ``max_frame_bytes - FRAME_HEADROOM``, so that any message fits a frame."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        return self.max_frame_bytes - FRAME_HEADROOM

    def with_(self, **changes: Any) -> MeshConfig:
        """Return a copy with some settings changed (validated again)."""
        return replace(self, **changes)


def parse_http_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` (port 0: any free port) as (host, port).

    Raises:
        ValueError: naming what is wrong with ``text``.
    """
    rest = text[len("http://") :] if text.startswith("http://") else text
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if "://" in rest or not (sep and host and port.isdigit() and 0 <= int(port) < 65536):
        raise ValueError(f"expected an HTTP endpoint HOST:PORT (e.g. 127.0.0.1:9100), got {text!r}")
    return host, int(port)


_LIST_KEYS = {
    "functions",
    "endpoints",
    "client_endpoints",
    "egress_immediate",
    "peer_keys",
    "client_keys",
    "metrics_endpoints",
}


def _key_path(value: Any, base: str) -> Any:
    """A relative key file path in a mesh.toml is relative to the file (key text stays as it is)."""
    from .security import is_key_text

    if not isinstance(value, str) or not value or is_key_text(value) or os.path.isabs(value):
        return value
    if len(value) == 40 and os.sep not in value:  # meant as key text: keep it, so the error says so
        return value
    candidate = os.path.join(base, value)
    return candidate


def load_config(path: str | os.PathLike[str], **overrides: Any) -> MeshConfig:
    """Read a ``mesh.toml`` file; ``overrides`` (e.g. from the command line) win over it.

    Top-level keys are :class:`MeshConfig` fields. Peers may instead be listed as
    ``[[peer]]`` tables with ``endpoint`` and an optional ``client_endpoint``; then
    ``peers`` is their count. A relative ``state_dir`` is relative to the file.

    Raises:
        ConfigError: the file is missing or is not valid TOML, a key is unknown, or a
            value is of the wrong type, naming the file and the key.
    """
    src = os.fspath(path)
    try:
        with open(src, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("the configuration file does not exist", source=src) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=src) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not valid TOML: the file is not UTF-8 ({exc.reason} at byte {exc.start})", source=src
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file: {exc.strerror}", source=src) from exc
    known = {f.name for f in fields(MeshConfig) if not f.name.startswith("_")}
    kwargs: dict[str, Any] = {}
    peer_tables = data.pop("peer", None)
    for key, value in data.items():
        if key not in known:
            hint = ", ".join(sorted(known))
            raise ConfigError(f"unknown setting (known: {hint}, and [[peer]] tables)", source=src, key=key)
        if key in _LIST_KEYS:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(f"expected a list of strings, got {value!r}", source=src, key=key)
            value = tuple(value)
        kwargs[key] = value
    if peer_tables is not None:
        if not isinstance(peer_tables, list) or not all(isinstance(t, dict) for t in peer_tables):
            raise ConfigError("expected [[peer]] tables", source=src, key="peer")
        eps: list[str] = []
        clients: list[str] = []
        metrics: list[str] = []
        pkeys: list[str] = []
        for i, table in enumerate(peer_tables):
            for k in table:
                if k not in ("endpoint", "client_endpoint", "public_key", "metrics_endpoint"):
                    raise ConfigError(
                        "unknown key (known: endpoint, client_endpoint, public_key, metrics_endpoint)",
                        source=src,
                        key=f"peer[{i}].{k}",
                    )
            me = table.get("metrics_endpoint", "")
            if not isinstance(me, str):
                raise ConfigError("expected HOST:PORT", source=src, key=f"peer[{i}].metrics_endpoint")
            metrics.append(me)
            if "public_key" in table:
                if not isinstance(table["public_key"], str):
                    raise ConfigError("expected a public key or key file path", source=src, key=f"peer[{i}].public_key")
                pkeys.append(table["public_key"])
            if not isinstance(table.get("endpoint"), str):
                raise ConfigError("expected an endpoint URL string", source=src, key=f"peer[{i}].endpoint")
            eps.append(table["endpoint"])
            ce = table.get("client_endpoint", "")
            if not isinstance(ce, str):
                raise ConfigError("expected an endpoint URL string", source=src, key=f"peer[{i}].client_endpoint")
            clients.append(ce)
        if "endpoints" in kwargs:
            raise ConfigError("give either endpoints or [[peer]] tables, not both", source=src, key="endpoints")
        if "peers" in kwargs and kwargs["peers"] != len(eps):
            raise ConfigError(
                f"peers = {kwargs['peers']!r} but {len(eps)} [[peer]] tables are given; drop peers or make them agree",
                source=src,
                key="peers",
            )
        kwargs["endpoints"] = tuple(eps)
        kwargs["peers"] = len(eps)
        if pkeys:
            if "peer_keys" in kwargs or len(pkeys) != len(eps):
                raise ConfigError(
                    "give public_key in every [[peer]] table, or peer_keys, not both", source=src, key="peer_keys"
                )
            kwargs["peer_keys"] = tuple(pkeys)
        if any(clients):
            kwargs["client_endpoints"] = tuple(clients)
        if any(metrics):
            if "metrics_endpoints" in kwargs:
                raise ConfigError(
                    "give either metrics_endpoints or [[peer]] metrics_endpoint, not both",
                    source=src,
                    key="metrics_endpoints",
                )
            kwargs["metrics_endpoints"] = tuple(metrics)
    base = os.path.dirname(os.path.abspath(src))
    if "secret_key" in kwargs:
        kwargs["secret_key"] = _key_path(kwargs["secret_key"], base)
    for name in ("peer_keys", "client_keys"):
        if isinstance(kwargs.get(name), tuple):
            kwargs[name] = tuple(_key_path(v, base) for v in kwargs[name])
    state_dir = kwargs.get("state_dir")
    if isinstance(state_dir, str) and not os.path.isabs(state_dir):
        kwargs["state_dir"] = os.path.join(os.path.dirname(os.path.abspath(src)), state_dir)
    module = kwargs.get("module")
    if isinstance(module, str) and module and not os.path.isabs(module):
        kwargs["module"] = os.path.join(os.path.dirname(os.path.abspath(src)), module)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return MeshConfig(**kwargs, _source=src)
    except TypeError as exc:  # a field given a value of a type dataclasses cannot take
        raise ConfigError(str(exc), source=src) from exc
