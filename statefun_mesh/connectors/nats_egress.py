"""A NATS JetStream egress: records of mesh egresses become JetStream messages, exactly once.

The bridge follows each configured egress on every peer (:meth:`MeshClient.fetch_egress
<statefun_mesh.client.MeshClient.fetch_egress>`), publishes every record to a subject made
from a template (see :class:`EgressRoute`), and waits for JetStream's ack. Each message
carries a ``Nats-Msg-Id`` derived from the record's identity: ``<egress>/<peer>/<offset>``
for a transactional egress (the default: a record is released when its checkpoint
completes, and keeps its ``(peer, offset)`` for ever), the record's ``id`` for an immediate
egress (``egress_immediate``: a recovery re-produces a record under the same id). So
JetStream drops a re-published record within the stream's duplicate window.

The position — per egress and peer, the offset after the last record JetStream acked, and
the peer's generation — is kept in a JetStream key-value bucket (key: the bridge's name),
written after the acks. A SIGKILL loses at most the records acked after the last write:
the restarted bridge publishes them again, and JetStream drops them by their ids.

Run it with ``statefun-mesh nats-egress`` or, inside an asyncio program::

    bridge = NatsEgress(NatsEgressConfig(routes=(EgressRoute("app/out", "out.{peer}"),), name="out"))
    await bridge.run(stop_event)

The user's guide is docs/connectors.md.

Why ~500 lines: routes, position bucket and publish loop are one connector that ships
as one optional module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import string
import time
from dataclasses import dataclass, field
from typing import Any, Final

from .. import _aio
from .. import valuetypes as vt
from ..address import parse_typename
from ..client import MeshClient
from ..egress_io import KAFKA_PRODUCER_RECORD_TYPENAME, KINESIS_EGRESS_RECORD_TYPENAME
from ..errors import ConfigError, StatefunMeshError
from ..logutil import ThrottledLog
from ..messages import EgressRecord
from .nats import HEADER_VALUE_TYPE, NATS_MSG_ID, _import_nats

__all__ = ["EgressRoute", "EgressStats", "NatsEgress", "NatsEgressConfig", "header_value", "message_id", "render"]

log = logging.getLogger("statefun_mesh.nats")

HEADER_EGRESS: Final = "Statefun-Egress"
HEADER_PEER: Final = "Statefun-Peer"
HEADER_OFFSET: Final = "Statefun-Offset"
HEADER_RECORD_ID: Final = "Statefun-Record-Id"
HEADER_KAFKA_TOPIC: Final = "Statefun-Kafka-Topic"
HEADER_KAFKA_KEY: Final = "Statefun-Kafka-Key"
HEADER_KINESIS_STREAM: Final = "Statefun-Kinesis-Stream"
HEADER_KINESIS_PARTITION_KEY: Final = "Statefun-Kinesis-Partition-Key"
HEADER_KINESIS_HASH_KEY: Final = "Statefun-Kinesis-Explicit-Hash-Key"

#: the fields a subject template may use
TEMPLATE_FIELDS: Final = frozenset(
    {"egress", "namespace", "name", "peer", "topic", "key", "stream", "partition_key", "type"}
)
_TEXT_TYPES: Final = frozenset(
    {
        vt.StringType.typename,
        vt.IntType.typename,
        vt.LongType.typename,
        vt.FloatType.typename,
        vt.DoubleType.typename,
        vt.BoolType.typename,
    }
)


def header_value(value: str) -> str:
    """``value`` safe in a NATS header line: ``%`` and control characters (an instance id or
    a Kafka key may hold a line break) percent-escaped, ``%0A``; anything else as it is."""
    if "%" not in value and all(" " <= c != "\x7f" for c in value):
        return value
    return "".join(f"%{ord(c):02X}" if c == "%" or c < " " or c == "\x7f" else c for c in value)


def message_id(record: EgressRecord) -> str:
    """The ``Nats-Msg-Id`` of a record: its ``id`` (immediate egress), else ``<egress>/<peer>/<offset>``."""
    return header_value(record.id if record.id is not None else f"{record.typename}/{record.peer}/{record.offset}")


def _token(value: str) -> str:
    """A record-derived value as one subject token: no dots, spaces or wildcards, never empty."""
    out = "".join("_" if c in ".*> \t\r\n" or ord(c) < 32 else c for c in value)
    return out or "_"


def _payload(record: EgressRecord) -> tuple[bytes, dict[str, str]]:
    """The message body of a record and the headers its format adds."""
    typename = record.value_typename()
    if typename == KAFKA_PRODUCER_RECORD_TYPENAME:
        k = record.as_kafka()
        return k.value, {HEADER_KAFKA_TOPIC: k.topic, HEADER_KAFKA_KEY: k.key}
    if typename == KINESIS_EGRESS_RECORD_TYPENAME:
        r = record.as_kinesis()
        headers = {HEADER_KINESIS_STREAM: r.stream, HEADER_KINESIS_PARTITION_KEY: r.partition_key}
        if r.explicit_hash_key:
            headers[HEADER_KINESIS_HASH_KEY] = r.explicit_hash_key
        return r.value, headers
    if typename in _TEXT_TYPES:  # as the ingress reads them: the value as text
        if typename == vt.StringType.typename:
            return record.as_string().encode("utf-8"), {}
        value = record.as_type(
            next(
                t for t in (vt.IntType, vt.LongType, vt.FloatType, vt.DoubleType, vt.BoolType) if t.typename == typename
            )
        )
        return (str(value).lower() if isinstance(value, bool) else repr(value)).encode(), {}
    return record.raw_value(), {}


def render(template: str, record: EgressRecord) -> tuple[str, bytes, dict[str, str]]:
    """Subject, payload and headers of the JetStream message for ``record``.

    Template fields: ``{egress}`` (``namespace.name``), ``{namespace}``, ``{name}``, ``{peer}``,
    ``{type}`` (the value type's name after its ``/``); for Kafka records ``{topic}`` and
    ``{key}``, for Kinesis records ``{stream}`` and ``{partition_key}`` (``_`` for other
    records). Record-derived values become one token each: ``.``, spaces and wildcards turn
    into ``_``, an empty value into ``_``.
    """
    payload, extra = _payload(record)
    namespace, name = record.typename.rsplit("/", 1)
    fields = {
        "egress": f"{namespace}.{name}",
        "namespace": namespace,
        "name": _token(name),
        "peer": str(record.peer),
        "type": _token(record.value_typename().rsplit("/", 1)[-1]),
        "topic": _token(extra.get(HEADER_KAFKA_TOPIC, "")),
        "key": _token(extra.get(HEADER_KAFKA_KEY, "")),
        "stream": _token(extra.get(HEADER_KINESIS_STREAM, "")),
        "partition_key": _token(extra.get(HEADER_KINESIS_PARTITION_KEY, "")),
    }
    headers = {
        NATS_MSG_ID: message_id(record),
        HEADER_VALUE_TYPE: record.value_typename(),
        HEADER_EGRESS: record.typename,
        HEADER_PEER: str(record.peer),
        HEADER_OFFSET: str(record.offset),
        **{k: header_value(v) for k, v in extra.items()},
    }
    if record.id is not None:
        headers[HEADER_RECORD_ID] = header_value(record.id)
    return template.format_map(fields), payload, headers


@dataclass(frozen=True)
class EgressRoute:
    """One egress and the subject template its records go to (``out.{peer}``, ``orders.{topic}.{key}``)."""

    egress: str
    subject: str

    def __post_init__(self) -> None:
        try:
            parse_typename(self.egress)
        except ValueError as exc:
            raise ConfigError(f"bad egress name {self.egress!r}: {exc}") from None
        try:
            used = [f for _, f, spec, conv in string.Formatter().parse(self.subject) if f is not None]
            if any(spec or conv for _, f, spec, conv in string.Formatter().parse(self.subject) if f is not None):
                raise ValueError("format specs and conversions are not supported")
        except ValueError as exc:
            raise ConfigError(f"bad subject template {self.subject!r}: {exc}") from None
        unknown = sorted({f for f in used if f not in TEMPLATE_FIELDS})
        if unknown:
            raise ConfigError(
                f"subject template {self.subject!r} uses unknown fields {unknown}; known: {sorted(TEMPLATE_FIELDS)}"
            )
        literal = string.Formatter().vformat(self.subject, (), dict.fromkeys(TEMPLATE_FIELDS, "x"))
        if not literal or any(t in ("", "*", ">") or any(c in t for c in " \t\r\n") for t in literal.split(".")):
            raise ConfigError(
                f"subject template {self.subject!r} does not make a subject to publish to "
                "(no empty tokens, spaces or wildcards)"
            )

    @classmethod
    def parse(cls, spec: str) -> EgressRoute:
        """``EGRESS=SUBJECT_TEMPLATE`` (the ``--route`` flag)."""
        egress, sep, subject = spec.partition("=")
        if not sep or not egress.strip() or not subject.strip():
            raise ConfigError(f"a route is EGRESS=SUBJECT_TEMPLATE (e.g. app/out=out.{{peer}}), got {spec!r}")
        return cls(egress.strip(), subject.strip())


@dataclass(frozen=True)
class NatsEgressConfig:
    """Settings of one bridge (the ``statefun-mesh nats-egress`` flags).

    Args:
        routes: the egresses to read and their subject templates.
        name: the bridge's name: the key of its position in the key-value bucket. Restart
            with the same name to go on; a new mesh (fresh state) needs a new name.
        nats_url: NATS server URL(s), comma-separated.
        mesh_endpoint: a peer's client endpoint; the bridge learns the others from it.
        kv_bucket: the JetStream key-value bucket of positions (created if missing).
        start: where an egress without a stored position starts: ``earliest`` or ``latest``.
        batch: records read per fetch, at most (published concurrently, then the position moves).
        publish_timeout: seconds to wait for JetStream's ack of one message before retrying it.
        mesh_timeout: seconds one read from a peer may take before it is retried.
        status_interval: seconds between progress lines, written only when a counter moved (0: none).
    """

    routes: tuple[EgressRoute, ...]
    name: str
    nats_url: str = "nats://127.0.0.1:4222"
    mesh_endpoint: str = "tcp://127.0.0.1:7700"
    kv_bucket: str = "statefun_mesh_egress"
    start: str = "earliest"
    batch: int = 500
    publish_timeout: float = 5.0
    mesh_timeout: float = 10.0
    status_interval: float = 10.0
    client_name: str = "statefun-mesh nats-egress"

    def __post_init__(self) -> None:
        if not self.routes:
            raise ConfigError("give at least one route: --route EGRESS=SUBJECT_TEMPLATE")
        egresses = [r.egress for r in self.routes]
        if len(set(egresses)) != len(egresses):
            raise ConfigError(f"an egress may have one route only, got {egresses}")
        for what, value in (("name", self.name), ("kv_bucket", self.kv_bucket)):
            if not value or any(not (c.isalnum() or c in "-_") for c in value):
                raise ConfigError(f"{what} must be letters, digits, '-' and '_' only, got {value!r}")
        if self.start not in ("earliest", "latest"):
            raise ConfigError(f"start must be 'earliest' or 'latest', got {self.start!r}")
        if not 1 <= self.batch <= 10_000:
            raise ConfigError(f"batch must be 1..10000, got {self.batch}")
        for what in ("publish_timeout", "mesh_timeout"):
            if not getattr(self, what) > 0:
                raise ConfigError(f"{what} must be positive, got {getattr(self, what)}")


@dataclass
class EgressStats:
    """Counters of one bridge run (also in its status lines)."""

    published: int = 0  #: records JetStream acked as new
    duplicates: int = 0  #: records JetStream acked as duplicates (re-published, dropped by their id)
    publish_retries: int = 0
    fetch_retries: int = 0
    position_writes: int = 0
    _last: int = field(default=0, repr=False)
    _last_time: float = field(default_factory=time.monotonic, repr=False)

    def line(self) -> str:
        now = time.monotonic()
        rate = (self.published - self._last) / max(now - self._last_time, 1e-9)
        self._last, self._last_time = self.published, now
        return (
            f"published {self.published} ({rate:.0f}/s lately), duplicates dropped {self.duplicates}, "
            f"publish retries {self.publish_retries}, fetch retries {self.fetch_retries}, "
            f"position writes {self.position_writes}"
        )


class NatsEgress:
    """One bridge from mesh egresses into JetStream. :meth:`run` it until a stop event."""

    def __init__(self, config: NatsEgressConfig) -> None:
        self.config = config
        self.stats = EgressStats()
        #: egress -> peer (as text) -> [next offset, generation]: what JetStream has acked
        self.positions: dict[str, dict[str, list[int]]] = {}
        self._dirty = asyncio.Event()
        self._js: Any = None
        self._kv: Any = None
        self._client: MeshClient | None = None
        self._tlog = ThrottledLog(log)
        self._closing = False
        #: true once the bridge follows the egresses (after start-up)
        self.running = False

    async def run(self, stop: asyncio.Event | None = None) -> EgressStats:
        """Bridge until ``stop`` is set; then write the position and return the counters.

        NATS or the mesh being unreachable is waited out (with back-off), never fatal.

        Raises:
            ConfigError: nats-py is missing.
        """
        nats = _import_nats()
        stop = stop or asyncio.Event()
        nc = await self._connect(nats, stop)
        if nc is None:
            return self.stats
        try:
            self._js = nc.jetstream()
            self._kv = await self._retry(stop, "open the key-value bucket", lambda: self._open_kv(nats))
            if self._kv is None:
                return self.stats
            stored = await self._retry(stop, "read the stored position", lambda: self._load(nats))
            if stored is None:
                return self.stats
            self.positions = stored
            self._client = MeshClient(self.config.mesh_endpoint, timeout=self.config.mesh_timeout)
            info = await self._retry(stop, f"reach the mesh at {self.config.mesh_endpoint}", self._client.info)
            if info is None:
                return self.stats
            endpoints = list(info.get("client_endpoints") or []) or [self.config.mesh_endpoint]
            if len(endpoints) != info.get("peers") or not all(endpoints):
                raise ConfigError(
                    "reading egress needs a client endpoint on every peer; set client_endpoints for all peers"
                )
            log.info(
                "nats-egress: %s from the mesh at %s (%d peers) into NATS %s; positions in bucket %s key %s",
                ", ".join(f"{r.egress} -> {r.subject}" for r in self.config.routes),
                self.config.mesh_endpoint,
                len(endpoints),
                self.config.nats_url,
                self.config.kv_bucket,
                self.config.name,
            )
            tasks = [
                asyncio.create_task(self._follow(nats, route, peer, ep), name=f"nats-egress {route.egress}@{peer}")
                for route in self.config.routes
                for peer, ep in enumerate(endpoints)
            ]
            helpers = [asyncio.create_task(self._saver()), asyncio.create_task(self._report())]
            self.running = True
            stopper = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stopper and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            finally:
                self.running = False
                for t in (stopper, *tasks, *helpers):
                    t.cancel()
                await asyncio.gather(stopper, *tasks, *helpers, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await _aio.wait_for(self._save(), 5.0)
                self._tlog.flush()
                log.info("nats-egress: stopped: %s", self.stats.line())
        finally:
            self._closing = True
            if self._client is not None:
                await self._client.aclose()
            with contextlib.suppress(Exception):
                await nc.close()
        return self.stats

    # -- start-up ------------------------------------------------------------------------------

    async def _connect(self, nats: Any, stop: asyncio.Event) -> Any:
        cfg = self.config

        async def on_error(exc: Exception) -> None:
            if connected:  # before, the connect loop below says why
                self._warn("NATS connection errors", f"NATS connection error: {exc!r}")

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("nats-egress: disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("nats-egress: reconnected to NATS")

        servers = [s.strip() for s in cfg.nats_url.split(",") if s.strip()]
        connected = False
        pause = 0.2
        while not stop.is_set():
            try:
                nc = await nats.connect(
                    servers=servers,
                    name=cfg.client_name,
                    connect_timeout=3,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                )
            except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
                self._warn(
                    "NATS connect failures",
                    f"cannot connect to NATS at {cfg.nats_url} ({exc!r}); retrying (every {pause:.1f} s)",
                )
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await _aio.wait_for(stop.wait(), pause)
                pause = min(pause * 2, 5.0)
                continue
            connected = True
            # once connected, reconnect for ever: the records wait in the mesh's egress logs meanwhile
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 1
            return nc
        return None

    async def _retry(self, stop: asyncio.Event, what: str, call: Any) -> Any:
        """``await call()`` until it succeeds (``None`` if stopped first)."""
        pause = 0.2
        while not stop.is_set():
            try:
                return await call()
            except (ConfigError, asyncio.CancelledError):
                raise
            except Exception as exc:
                self._warn(f"failures to {what}", f"cannot {what} ({exc!r}); retrying")
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await _aio.wait_for(stop.wait(), pause)
                pause = min(pause * 2, 5.0)
        return None

    async def _open_kv(self, nats: Any) -> Any:
        try:
            return await self._js.key_value(self.config.kv_bucket)
        except nats.js.errors.BucketNotFoundError:
            return await self._js.create_key_value(
                bucket=self.config.kv_bucket, history=1, description="statefun-mesh nats-egress positions"
            )

    async def _load(self, nats: Any) -> dict[str, dict[str, list[int]]]:
        try:
            entry = await self._kv.get(self.config.name)
        except nats.js.errors.KeyNotFoundError:
            return {}
        try:
            doc = json.loads(entry.value or b"{}")
            return {str(e): {str(p): [int(v[0]), int(v[1])] for p, v in peers.items()} for e, peers in doc.items()}
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            raise ConfigError(
                f"the stored position {self.config.kv_bucket}/{self.config.name} is unreadable "
                f"({exc}); delete the key to start over (nats kv del)"
            ) from None

    # -- the work ------------------------------------------------------------------------------

    async def _follow(self, nats: Any, route: EgressRoute, peer: int, endpoint: str) -> None:
        """Read one peer's records of one egress, publish them, then move the position."""
        assert self._client is not None
        key = str(peer)
        stored = self.positions.get(route.egress, {}).get(key)
        pos: int | str = stored[0] if stored else self.config.start
        gen = stored[1] if stored else -1
        pause = 0.1
        while True:
            try:
                got, nxt, records, gen = await self._client.fetch_egress(
                    route.egress, endpoint, pos, gen, limit=self.config.batch, wait=1.0
                )
            except (StatefunMeshError, OSError) as exc:
                self.stats.fetch_retries += 1
                self._warn(
                    "egress read failures",
                    f"reading {route.egress} from peer {peer} at {endpoint} failed ({exc!r}); retrying",
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1
            if got != peer:
                raise StatefunMeshError(
                    f"the peer at {endpoint} says it is peer {got}, not {peer}: the mesh's "
                    "client_endpoints are not in peer order"
                )
            if records:
                await self._publish(nats, route, records)
            first = isinstance(pos, str)  # "earliest"/"latest" resolved: remember where that was
            pos = nxt
            self.positions.setdefault(route.egress, {})[key] = [nxt, gen]
            if records or first:
                self._dirty.set()

    async def _publish(self, nats: Any, route: EgressRoute, records: list[EgressRecord]) -> None:
        """Publish ``records``; return once JetStream acked every one (retrying those that failed)."""
        msgs = [render(route.subject, r) for r in records]
        pending = list(range(len(msgs)))
        pause = 0.1
        while pending:
            results = await asyncio.gather(
                *(
                    self._js.publish(msgs[i][0], msgs[i][1], headers=msgs[i][2], timeout=self.config.publish_timeout)
                    for i in pending
                ),
                return_exceptions=True,
            )
            failed = []
            for i, res in zip(pending, results, strict=True):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                if isinstance(res, BaseException):
                    failed.append(i)
                    error = res
                elif getattr(res, "duplicate", False):
                    self.stats.duplicates += 1
                else:
                    self.stats.published += 1
            if failed:
                self.stats.publish_retries += len(failed)
                hint = (
                    " (no stream captures it: create one, e.g. nats stream add)"
                    if isinstance(error, nats.errors.NoRespondersError)
                    else ""
                )
                self._warn(
                    "publish failures",
                    f"publishing {len(failed)} records of {route.egress} (e.g. to "
                    f"{msgs[failed[0]][0]}) failed: {error!r}{hint}; retrying",
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
            pending = failed

    async def _save(self) -> None:
        if self._kv is None:
            return
        self._dirty.clear()
        await self._kv.put(self.config.name, json.dumps(self.positions, sort_keys=True).encode())
        self.stats.position_writes += 1

    async def _saver(self) -> None:
        """Write the position whenever it moved (at most every 0.2 s: one write covers many batches)."""
        while True:
            await self._dirty.wait()
            try:
                await self._save()
            except Exception as exc:
                self._dirty.set()
                self._warn(
                    "position write failures",
                    f"writing the position to bucket {self.config.kv_bucket} failed ({exc!r}); retrying",
                )
                await asyncio.sleep(1.0)
            await asyncio.sleep(0.2)

    async def _report(self) -> None:
        """Every second: summaries of throttled warnings; every ``status_interval``, a progress
        line if a counter moved (quiet while idle)."""
        last: tuple[int, ...] = ()
        interval = self.config.status_interval
        due = time.monotonic() + interval
        while True:
            await asyncio.sleep(1.0 if interval <= 0 else min(1.0, interval))
            self._tlog.flush()
            if interval <= 0 or time.monotonic() < due:
                continue
            due = time.monotonic() + interval
            s = self.stats
            now = (s.published, s.duplicates, s.publish_retries, s.fetch_retries)
            if now != last:
                last = now
                log.info("nats-egress: %s", s.line())

    def _warn(self, kind: str, text: str) -> None:
        """A warning; more of the same ``kind`` within 10 s are counted and summarised."""
        self._tlog.warning(kind, "nats-egress: %s", text)
