"""A NATS JetStream ingress: messages of a JetStream stream become mesh messages, exactly once.

The bridge reads a stream through a durable pull consumer with explicit acks, maps each
NATS message to a :class:`~statefun_mesh.messages.Message` (see :class:`NatsMapping`),
sends it with :meth:`MeshClient.send <statefun_mesh.client.MeshClient.send>` and an
idempotency key derived from the message, and acks the JetStream message only after the
mesh acknowledged it (the message is then in a peer's fsynced ingress log). A crash of the
bridge between the two acks makes JetStream deliver the message again; the mesh drops the
second copy by its idempotency key. The effect on function state is exactly once.

Run it with ``statefun-mesh nats-ingress`` or, inside an asyncio program::

    bridge = NatsIngress(NatsIngressConfig(stream="ORDERS", durable="mesh", subject="orders.>"))
    await bridge.run(stop_event)

The user's guide is docs/connectors.md. The client library is nats-py
(``pip install 'statefun-mesh[nats]'``), imported when a bridge starts.

Why above ~500 lines: the mapping (:class:`NatsMapping`, its checks and key derivation),
the config and the bridge loop are one connector that ships as one optional module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .. import _aio
from .. import valuetypes as vt
from ..address import check_id, parse_typename
from ..client import MeshClient
from ..errors import ConfigError, FunctionNotFoundError, StatefunMeshError, UnmappableMessage
from ..messages import Message

__all__ = [
    "HEADER_TARGET_ID",
    "HEADER_TARGET_TYPE",
    "HEADER_VALUE_TYPE",
    "BridgeStats",
    "NatsIngress",
    "NatsIngressConfig",
    "NatsMapping",
    "UnmappableMessage",
    "idempotency_key",
]

log = logging.getLogger("statefun_mesh.nats")

HEADER_TARGET_TYPE: Final = "Statefun-Target-Type"
HEADER_TARGET_ID: Final = "Statefun-Target-Id"
HEADER_VALUE_TYPE: Final = "Statefun-Value-Type"
#: headers the bridge adds to a message it forwards to the dead-letter subject
HEADER_ERROR: Final = "Statefun-Error"
HEADER_SOURCE_SUBJECT: Final = "Statefun-Source-Subject"
HEADER_SOURCE_SEQUENCE: Final = "Statefun-Source-Sequence"
HEADER_SOURCE_MSG_ID: Final = "Statefun-Source-Msg-Id"
NATS_MSG_ID: Final = "Nats-Msg-Id"

INSTALL_HINT: Final = "the NATS ingress needs nats-py: pip install 'statefun-mesh[nats]'  (or: pip install nats-py)"

# The six StateFun primitive types: a NATS payload for one of them is the value as text.
_TEXT_TYPES: Final[dict[str, tuple[vt.Type, Any]]] = {
    vt.StringType.typename: (vt.StringType, str),
    vt.IntType.typename: (vt.IntType, int),
    vt.LongType.typename: (vt.LongType, int),
    vt.FloatType.typename: (vt.FloatType, float),
    vt.DoubleType.typename: (vt.DoubleType, float),
    vt.BoolType.typename: (vt.BoolType, None),
}
_BOOLS: Final = {"true": True, "1": True, "false": False, "0": False}


def _import_nats() -> Any:
    try:
        import nats  # the nats-py client library (this module is statefun_mesh.connectors.nats)
        import nats.errors
        import nats.js.api
        import nats.js.errors
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    return nats


# -- mapping -------------------------------------------------------------------------------------


def idempotency_key(headers: Mapping[str, str] | None, stream: str, seq: int, stream_created_ms: int) -> str:
    """The mesh idempotency key of a JetStream message.

    ``Nats-Msg-Id`` as it is when the publisher set one (so a publisher's retry that got
    into the stream twice, past JetStream's duplicate window, is still applied once), else
    ``<stream>:<stream sequence>@<stream creation time in ms>``. The creation time keeps a
    stream that was deleted and created again, whose sequences restart at 1, from reusing
    keys the mesh still remembers.
    """
    if headers:
        msg_id = headers.get(NATS_MSG_ID)
        if msg_id is None:
            msg_id = next((v for k, v in headers.items() if k.lower() == "nats-msg-id"), None)
        if msg_id:
            return msg_id
    return f"{stream}:{seq}@{stream_created_ms}"


@dataclass(frozen=True)
class NatsMapping:
    """How a NATS message becomes a mesh message.

    Target (the headers win over the subject):

    - type: header ``Statefun-Target-Type``, else ``target_type``, else from the subject;
    - id: header ``Statefun-Target-Id``, else from the subject.

    The subject, after ``subject_prefix`` (its leading tokens), spells what the headers
    and ``target_type`` leave open: ``<namespace>.<name>.<id>`` when both are open
    (``orders.com.example.cart.alice`` with prefix ``orders`` is ``com.example/cart``,
    id ``alice``: the namespace takes every token before the last two); ``<id>`` when the
    type is known (then the id may contain dots); ``<namespace>.<name>`` when the id is.

    Value: the type name is header ``Statefun-Value-Type``, else ``value_type``. For the six
    StateFun primitive types (``io.statefun.types/string``, ``int``, ``long``, ``float``,
    ``double``, ``bool``) the payload is the value written as UTF-8 text (``42``, ``true``,
    ``hello``) and the bridge encodes it, so functions read it with ``as_string()``,
    ``as_int()``...; for any other type name the payload *is* the value's encoded bytes,
    passed on unchanged (a ``make_json_type`` type: the JSON document; msgpack, protobuf:
    their bytes) — StateFun's Kafka-ingress convention.
    """

    subject_prefix: str = ""
    target_type: str | None = None
    value_type: str = vt.StringType.typename

    def __post_init__(self) -> None:
        try:
            if self.target_type is not None:
                parse_typename(self.target_type)
            parse_typename(self.value_type)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.subject_prefix and any(t in ("*", ">", "") for t in self.subject_prefix.split(".")):
            raise ConfigError(f"subject prefix {self.subject_prefix!r} must be literal tokens (no wildcards)")

    def map(self, subject: str, headers: Mapping[str, str] | None, data: bytes) -> Message:
        """The mesh message for one NATS message.

        Raises:
            UnmappableMessage: the target or the value cannot be read from it.
        """
        h = {k.lower(): v for k, v in headers.items()} if headers else {}
        typename = h.get(HEADER_TARGET_TYPE.lower()) or self.target_type
        id = h.get(HEADER_TARGET_ID.lower())
        if typename is None or id is None:
            tokens = self._subject_tokens(subject)
            if typename is None and id is None:
                if len(tokens) < 3:
                    raise UnmappableMessage(
                        f"subject {subject!r} does not spell <namespace>.<name>.<id> after the prefix "
                        f"{self.subject_prefix!r}, and the message has no {HEADER_TARGET_TYPE} header"
                    )
                typename, id = ".".join(tokens[:-2]) + "/" + tokens[-2], tokens[-1]
            elif typename is None:
                if len(tokens) < 2:
                    raise UnmappableMessage(
                        f"subject {subject!r} does not spell <namespace>.<name> after the prefix "
                        f"{self.subject_prefix!r}, and the message has no {HEADER_TARGET_TYPE} header"
                    )
                typename = ".".join(tokens[:-1]) + "/" + tokens[-1]
            else:
                if not tokens:
                    raise UnmappableMessage(
                        f"subject {subject!r} has no id after the prefix {self.subject_prefix!r}, "
                        f"and the message has no {HEADER_TARGET_ID} header"
                    )
                id = ".".join(tokens)
        try:
            parse_typename(typename)
            id = check_id(id)
        except (TypeError, ValueError) as exc:
            raise UnmappableMessage(f"bad target: {exc}") from None
        value_typename = h.get(HEADER_VALUE_TYPE.lower()) or self.value_type
        return Message(typename, id, value_typename, self._value(value_typename, data))

    def _subject_tokens(self, subject: str) -> list[str]:
        prefix = self.subject_prefix
        if not prefix:
            return subject.split(".")
        if not subject.startswith(prefix + "."):
            raise UnmappableMessage(f"subject {subject!r} does not start with the prefix {prefix + '.'!r}")
        return subject[len(prefix) + 1 :].split(".")

    @staticmethod
    def _value(value_typename: str, data: bytes) -> bytes:
        text_type = _TEXT_TYPES.get(value_typename)
        if text_type is None:
            try:
                parse_typename(value_typename)
            except ValueError as exc:
                raise UnmappableMessage(f"bad {HEADER_VALUE_TYPE}: {exc}") from None
            return data
        tpe, conv = text_type
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnmappableMessage(f"a {value_typename} payload must be UTF-8 text: {exc}") from None
        try:
            if conv is None:
                value: Any = _BOOLS[text.strip().lower()]
            else:
                value = conv(text if conv is str else text.strip())
            return tpe.serializer().serialize(value)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise UnmappableMessage(f"payload {data[:40]!r} is not a valid {value_typename} value ({exc!r})") from None


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatsIngressConfig:
    """Settings of one bridge (the ``statefun-mesh nats-ingress`` flags).

    Args:
        stream: the JetStream stream to read (it must exist).
        durable: the durable consumer's name; created, or updated to these settings.
        nats_url: NATS server URL(s), comma-separated.
        mesh_endpoint: a peer's client endpoint; the bridge learns the others from it.
        subject: the consumer's filter subject (default: every subject of the stream).
        subject_prefix: leading subject tokens that are not part of the target (default:
            the literal tokens of ``subject``, or of the stream's only subject).
        target_type: fixed target function type (the subject then carries only the id).
        value_type: value type name of messages without a ``Statefun-Value-Type`` header.
        dead_letter_subject: where unmappable messages go (published through JetStream, so
            a stream must capture it); ``None``: they are only logged and terminated.
        max_in_flight: messages between fetch and ack, at most (sends run concurrently).
        max_ack_pending: the consumer's limit of delivered, unacknowledged messages.
        fetch_batch: messages asked for per fetch.
        ack_wait: seconds JetStream waits for an ack before it delivers a message again
            (the bridge signals progress on messages it still works on).
        mesh_timeout: seconds one send may take before it is retried.
        status_interval: seconds between progress log lines, written only when a counter
            changed since the last one (0: none).
        ordered: send the messages of one target instance one after another, in stream
            order (the default); ``False`` pipelines them too, which is faster for hot
            instances but lets a retried send overtake a later one.
        client_name: the NATS connection's name, as the server shows it.
    """

    stream: str
    durable: str
    nats_url: str = "nats://127.0.0.1:4222"
    mesh_endpoint: str = "tcp://127.0.0.1:7700"
    subject: str | None = None
    subject_prefix: str | None = None
    target_type: str | None = None
    value_type: str = vt.StringType.typename
    dead_letter_subject: str | None = None
    max_in_flight: int = 256
    max_ack_pending: int = 1024
    fetch_batch: int = 128
    ack_wait: float = 30.0
    mesh_timeout: float = 10.0
    status_interval: float = 10.0
    ordered: bool = True
    client_name: str = "statefun-mesh nats-ingress"

    def __post_init__(self) -> None:
        for name in ("stream", "durable"):
            value = getattr(self, name)
            if not value or any(c in value for c in " .*>\t"):
                raise ConfigError(f"{name} must be a JetStream name without spaces, dots or wildcards, got {value!r}")
        for name in ("max_in_flight", "max_ack_pending", "fetch_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_ack_pending < self.max_in_flight:
            raise ConfigError(
                f"max_ack_pending ({self.max_ack_pending}) must be at least max_in_flight ({self.max_in_flight})"
            )
        for name in ("ack_wait", "mesh_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ack_wait < 3:
            raise ConfigError(
                f"ack_wait must be at least 3 s (progress is signalled every ack_wait/3), got {self.ack_wait}"
            )
        NatsMapping(self.subject_prefix or "", self.target_type, self.value_type)  # checks them


def _literal_prefix(subject: str) -> str:
    """The tokens of ``subject`` before its first wildcard (``orders.eu.>`` -> ``orders.eu``);
    empty for a subject without wildcards."""
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token in ("*", ">"):
            return ".".join(tokens[:i])
    return ""


# -- the bridge ----------------------------------------------------------------------------------


@dataclass
class BridgeStats:
    """Counters of one bridge run (also in its status log lines)."""

    fetched: int = 0
    bridged: int = 0  #: sent to the mesh, acknowledged by it, then acked to JetStream
    redelivered: int = 0  #: deliveries JetStream marked as repeated (num_delivered > 1)
    rejected: int = 0  #: unmappable: terminated (and dead-lettered, if configured)
    dead_lettered: int = 0
    send_retries: int = 0  #: sends retried after a timeout or a transport error
    ack_errors: int = 0
    _last_bridged: int = field(default=0, repr=False)
    _last_time: float = field(default_factory=time.monotonic, repr=False)

    def line(self, in_flight: int) -> str:
        """A status line: totals, and the rate since the previous line."""
        now = time.monotonic()
        rate = (self.bridged - self._last_bridged) / max(now - self._last_time, 1e-9)
        self._last_bridged, self._last_time = self.bridged, now
        return (
            f"bridged {self.bridged} ({rate:.0f}/s lately), redelivered {self.redelivered}, "
            f"rejected {self.rejected} (dead-lettered {self.dead_lettered}), send retries {self.send_retries}, "
            f"ack errors {self.ack_errors}, in flight {in_flight}"
        )


class NatsIngress:
    """One bridge from a JetStream stream into a mesh. :meth:`run` it until a stop event."""

    def __init__(self, config: NatsIngressConfig) -> None:
        self.config = config
        self.stats = BridgeStats()
        self.mapping: NatsMapping | None = None
        self._created_ms = 0
        self._nats: Any = None
        self._js: Any = None
        self._clients: list[MeshClient] = []
        self._in_flight: dict[int, tuple[Any, float]] = {}  # task id -> (NATS message, start)
        self._slot_free = asyncio.Event()
        self._tails: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0
        self._suppressed = 0
        self._closing = False
        #: true while the bridge fetches messages (after start-up, before it drains)
        self.consuming = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> BridgeStats:
        """Bridge until ``stop`` is set; then finish the messages in flight and return the counters.

        Raises:
            ConfigError: nats-py is missing, or the stream or consumer cannot be used.
            StatefunMeshError: NATS cannot be reached at start-up.
        """
        nats = _import_nats()
        stop = stop or asyncio.Event()
        cfg = self.config
        nc = await self._connect(nats)
        try:
            js = self._js = nc.jetstream()
            psub = await self._setup_consumer(nats, js)
            await self._connect_mesh()
            log.info(
                "nats-ingress: stream %s, consumer %s (filter %s), into the mesh at %s; subject prefix %r, "
                "target type %s, default value type %s, unmappable messages %s",
                cfg.stream,
                cfg.durable,
                cfg.subject or "all subjects",
                ", ".join(c.endpoint for c in self._clients),
                self.mapping.subject_prefix if self.mapping else "",
                cfg.target_type or "from headers/subject",
                cfg.value_type,
                f"to {cfg.dead_letter_subject}" if cfg.dead_letter_subject else "terminated and logged",
            )
            helpers = [asyncio.create_task(self._keep_alive(), name="nats-ingress progress")]
            if cfg.status_interval > 0:
                helpers.append(asyncio.create_task(self._report(), name="nats-ingress status"))
            try:
                self.consuming = True
                await self._consume(nats, js, psub, stop)
            finally:
                self.consuming = False
                await self._drain()
                for t in helpers:
                    t.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=5)  # the acks of the last messages
                log.info("nats-ingress: stopped: %s", self.stats.line(len(self._in_flight)))
        finally:
            self._closing = True
            for c in self._clients:
                await c.aclose()
            with contextlib.suppress(Exception):
                await nc.close()
        return self.stats

    async def _connect(self, nats: Any) -> Any:
        cfg = self.config

        async def on_error(exc: Exception) -> None:
            log.warning("nats-ingress: NATS connection error: %s", exc)

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("nats-ingress: disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("nats-ingress: reconnected to NATS")

        servers = [s.strip() for s in cfg.nats_url.split(",") if s.strip()]
        try:
            # a few attempts at start-up, so a wrong URL fails fast with a clear message ...
            nc = await nats.connect(
                servers=servers,
                name=cfg.client_name,
                connect_timeout=5,
                max_reconnect_attempts=3,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
            raise StatefunMeshError(f"cannot connect to NATS at {cfg.nats_url}: {exc or type(exc).__name__}") from None
        # ... and, once connected, reconnect for ever: pending messages wait in JetStream meanwhile
        nc.options["max_reconnect_attempts"] = -1
        return nc

    async def _setup_consumer(self, nats: Any, js: Any) -> Any:
        cfg = self.config
        api = nats.js.api
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            raise ConfigError(
                f"JetStream has no stream {cfg.stream!r} at {cfg.nats_url}; create it first (e.g. nats stream add)"
            ) from None
        created = getattr(info, "created", None)
        self._created_ms = int(created.timestamp() * 1000) if created else 0
        prefix = cfg.subject_prefix
        if prefix is None:
            subjects = [cfg.subject] if cfg.subject else list(info.config.subjects or [])
            prefix = _literal_prefix(subjects[0]) if len(subjects) == 1 else ""
            if len(subjects) > 1:
                log.warning(
                    "nats-ingress: stream %s has several subjects %s and no --subject-prefix was given: "
                    "the whole subject spells the target",
                    cfg.stream,
                    subjects,
                )
        self.mapping = NatsMapping(prefix, cfg.target_type, cfg.value_type)
        consumer = api.ConsumerConfig(
            durable_name=cfg.durable,
            name=cfg.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=cfg.ack_wait,
            max_ack_pending=cfg.max_ack_pending,
            max_deliver=-1,
            filter_subject=cfg.subject,
            description="statefun-mesh nats-ingress",
        )
        try:
            # create, or update an existing consumer to these settings (ack_wait, max_ack_pending, filter)
            ci = await js.add_consumer(cfg.stream, consumer)
        except nats.js.errors.APIError as exc:
            raise ConfigError(
                f"cannot create or update the durable consumer {cfg.durable!r} on stream {cfg.stream!r}: {exc}"
            ) from None
        log.info(
            "nats-ingress: consumer %s: %d messages waiting, %d delivered and not yet acked (they come "
            "again after ack_wait %.0f s)",
            cfg.durable,
            ci.num_pending,
            ci.num_ack_pending,
            cfg.ack_wait,
        )
        return await js.pull_subscribe_bind(durable=cfg.durable, stream=cfg.stream)

    async def _connect_mesh(self) -> None:
        cfg = self.config
        first = MeshClient(cfg.mesh_endpoint, timeout=cfg.mesh_timeout)
        self._clients = [first]
        try:
            info = await first.info()
            others = [ep for ep in info.get("client_endpoints") or [] if ep and ep != cfg.mesh_endpoint]
        except StatefunMeshError as exc:
            log.warning(
                "nats-ingress: the mesh at %s did not answer (%s); sending there anyway and retrying until it does",
                cfg.mesh_endpoint,
                exc,
            )
            return
        # the other peers' endpoints: a send that times out is retried through the next one
        self._clients += [MeshClient(ep, timeout=cfg.mesh_timeout, keys=first.keys) for ep in others]

    # -- consuming ---------------------------------------------------------------------------

    async def _consume(self, nats: Any, js: Any, psub: Any, stop: asyncio.Event) -> None:
        cfg = self.config
        pause = 0.1
        # fetch when this many slots are free (or after a quiet second, whatever is free):
        # refilling slot by slot would cost a fetch round trip per message
        low_water = max(1, min(cfg.fetch_batch, cfg.max_in_flight // 4))
        while not stop.is_set():
            self._slot_free.clear()
            free = cfg.max_in_flight - len(self._tasks)
            if free < low_water:
                try:
                    await _aio.wait_for(self._slot_free.wait(), 1.0)
                    continue
                except (asyncio.TimeoutError, TimeoutError):
                    if cfg.max_in_flight - len(self._tasks) <= 0:
                        continue
                free = cfg.max_in_flight - len(self._tasks)
            try:
                msgs = await psub.fetch(min(cfg.fetch_batch, free), timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as exc:  # disconnected, consumer deleted, ...
                self._warn(f"fetch from {cfg.stream}/{cfg.durable} failed: {exc!r}; retrying in {pause:.1f} s")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                if isinstance(exc, nats.js.errors.NotFoundError):
                    with contextlib.suppress(Exception):
                        psub = await self._setup_consumer(nats, js)
                continue
            pause = 0.1
            for msg in msgs:
                self.stats.fetched += 1
                task = asyncio.create_task(self._handle(msg))
                self._tasks.add(task)
                self._in_flight[id(task)] = (msg, time.monotonic())
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight.pop(id(task), None)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("nats-ingress: a message handler failed: %r", task.exception())

    async def _drain(self) -> None:
        """Let the messages in flight finish (bounded); the rest are redelivered later."""
        if not self._tasks:
            return
        timeout = self.config.mesh_timeout + 5.0
        log.info("nats-ingress: stopping: waiting up to %.0f s for %d messages in flight", timeout, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
            log.warning(
                "nats-ingress: %d messages were not acked; JetStream delivers them again (the mesh drops "
                "those it already has)",
                len(pending),
            )

    async def _handle(self, msg: Any) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if meta.num_delivered > 1:
            self.stats.redelivered += 1
        assert self.mapping is not None
        try:
            message = self.mapping.map(msg.subject, msg.headers, msg.data)
        except UnmappableMessage as exc:
            await self._reject(msg, seq, str(exc))
            return
        key = idempotency_key(msg.headers, self.config.stream, seq, self._created_ms)
        if not self.config.ordered:
            error = await self._send(message, key, seq)
        else:
            error = await self._send_in_order(message, key, seq)
        if error is not None:
            await self._reject(msg, seq, error)
            return
        try:
            await msg.ack()
            self.stats.bridged += 1
        except Exception as exc:  # the mesh has it; JetStream delivers it again and the mesh drops that copy
            self.stats.ack_errors += 1
            self._warn(f"ack of {self.config.stream} message {seq} failed: {exc!r}; it will be delivered again")

    async def _send_in_order(self, message: Message, key: str, seq: int) -> str | None:
        """:meth:`_send` after the previous message to the same instance is done (stream order)."""
        addr = (message.target_typename, message.target_id)
        prev = self._tails.get(addr)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[addr] = mine
        try:
            if prev is not None:
                await asyncio.shield(prev)
            return await self._send(message, key, seq)
        finally:
            mine.set_result(None)
            if self._tails.get(addr) is mine:
                del self._tails[addr]

    async def _send(self, message: Message, key: str, seq: int) -> str | None:
        """Send until the mesh acknowledges; return the reason if it refuses the message for good."""
        attempt = 0
        pause = 0.05
        while True:
            client = self._clients[attempt % len(self._clients)]
            attempt += 1
            try:
                await client.send(message, idempotency_key=key)
                return None
            except FunctionNotFoundError as exc:
                return f"the mesh has no function {message.target_typename}: {exc}"
            except (ValueError, TypeError) as exc:  # the peer's checks of the target
                return f"the mesh refused the message: {exc}"
            except (StatefunMeshError, OSError) as exc:
                # timed out or the transport failed: the outcome is unknown, and a resend with
                # the same key is applied at most once, so retry (through the next peer)
                self.stats.send_retries += 1
                self._warn(
                    f"send of {self.config.stream} message {seq} to {message.target_typename}/"
                    f"{message.target_id} via {client.endpoint} failed ({exc!r}); retrying"
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _reject(self, msg: Any, seq: int, reason: str) -> None:
        """An unmappable message: dead-letter it if configured, then terminate it (no redelivery)."""
        cfg = self.config
        subject = msg.subject
        if cfg.dead_letter_subject:
            headers = {k: v for k, v in (msg.headers or {}).items() if k.lower() != "nats-msg-id"}
            if msg.headers and NATS_MSG_ID in msg.headers:
                headers[HEADER_SOURCE_MSG_ID] = msg.headers[NATS_MSG_ID]
            headers.update(
                {
                    HEADER_ERROR: reason[:1000],
                    HEADER_SOURCE_SUBJECT: subject,
                    HEADER_SOURCE_SEQUENCE: str(seq),
                    NATS_MSG_ID: f"dead-letter:{cfg.stream}:{seq}@{self._created_ms}",
                }
            )
            try:
                await self._js.publish(cfg.dead_letter_subject, msg.data, headers=headers, timeout=5.0)
            except Exception as exc:
                # not terminated: JetStream delivers it again after ack_wait and we try again
                log.error(
                    "nats-ingress: %s message %d (subject %s) is unmappable (%s), and publishing it to "
                    "the dead-letter subject %s failed (%r); it stays pending and is retried after ack_wait",
                    cfg.stream,
                    seq,
                    subject,
                    reason,
                    cfg.dead_letter_subject,
                    exc,
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=cfg.ack_wait)
                return
            self.stats.dead_lettered += 1
            log.warning(
                "nats-ingress: %s message %d (subject %s) dead-lettered to %s: %s",
                cfg.stream,
                seq,
                subject,
                cfg.dead_letter_subject,
                reason,
            )
        else:
            log.error(
                "nats-ingress: %s message %d (subject %s) terminated, not bridged: %s", cfg.stream, seq, subject, reason
            )
        self.stats.rejected += 1
        try:
            await msg.term()
        except Exception as exc:
            self.stats.ack_errors += 1
            self._warn(f"term of {cfg.stream} message {seq} failed: {exc!r}; it will be delivered again")

    # -- helpers -----------------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        """Tell JetStream about messages still in work, so it does not deliver them again."""
        every = self.config.ack_wait / 3
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for msg, started in list(self._in_flight.values()):
                if now - started >= every:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _report(self) -> None:
        last: tuple[int, ...] = ()
        while True:
            await asyncio.sleep(self.config.status_interval)
            s = self.stats
            now = (
                s.bridged,
                s.redelivered,
                s.rejected,
                s.dead_lettered,
                s.send_retries,
                s.ack_errors,
                len(self._in_flight),
            )
            if now == last:  # quiet while idle: a line only when something moved
                continue
            last = now
            log.info("nats-ingress: %s", s.line(len(self._in_flight)))

    def _warn(self, text: str) -> None:
        """A warning, at most one per 5 s (the others are counted and summarised)."""
        now = time.monotonic()
        if now - self._last_warning < 5.0:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} similar warnings suppressed)" if self._suppressed else ""
        self._last_warning, self._suppressed = now, 0
        log.warning("nats-ingress: %s%s", text, more)
