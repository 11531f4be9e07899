"""The Kafka ingress of ``module.yaml`` (``io.statefun.kafka.v1/ingress``), run inside the peers.

Every peer runs one consumer per ingress component and reads the partitions it owns:
partition ``p`` of every topic of the ingress belongs to peer ``p % peers``. Partitions are
assigned (``assign()``), never balanced by the group protocol, so a partition is read by
exactly one peer. The consumer group only receives the offsets of completed checkpoints
(for monitoring, and for ``startupPosition: group-offsets``).

A record becomes one message per target function type of its topic: id = the record key
(UTF-8), value = the record value as it is, typed with the topic's ``valueType`` (StateFun's
convention). The peer routes the messages at once, on its event loop, and advances its
position for the partition (the next offset) in the same step. The positions are part of the
peer's checkpoint part (``PeerPart.sources``): a checkpoint's cut covers exactly the records
routed before it, and after a failure the peers restore the positions and seek there. So
each record affects function state exactly once. After a rescale the partitions move with
``p % peers``, and each keeps the position recorded by its former peer.

Records that cannot become messages (no key, a key that is not UTF-8, no value, a value
that is not a valid value of a StateFun primitive ``valueType``, or too large) are dead
letters: logged with topic, partition and offset, counted, kept in :attr:`KafkaIngress.dead_letters`
(the newest 100), and skipped; they are covered by the position like any other record.

The broker being away (down at start, a topic missing, authorization refused) is logged
clearly and retried with backoff; positions advance only with routed records, so nothing is
lost meanwhile. Backpressure: a consumer polls only while its peer admits input
(:meth:`Peer.admit <statefun_mesh.peer.Peer.admit>`).

The client library is confluent-kafka (librdkafka), imported when a peer starts an ingress
(``pip install 'statefun-mesh[kafka]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from .. import valuetypes as vt
from ..errors import ConfigError, MessageTooLargeError
from ..logutil import ThrottledLog
from .kafka_spec import KafkaIngressSpec
from .workers import ClientTasks

if TYPE_CHECKING:
    from ..peer import Peer

__all__ = ["INSTALL_HINT", "KafkaIngress", "position_key"]

log = logging.getLogger("statefun_mesh.kafka")

INSTALL_HINT: Final = "Kafka ingresses need confluent-kafka: pip install 'statefun-mesh[kafka]' (or confluent-kafka)"
#: records per poll, at most
POLL_BATCH: Final = 500
#: seconds a poll waits for records
POLL_WAIT: Final = 0.2
#: seconds between metadata checks (new partitions, topics that were missing)
METADATA_EVERY: Final = 10.0
#: the StateFun primitive types: a record's value must decode as one
_PRIMITIVES: Final = {
    t.typename: t for t in (vt.StringType, vt.IntType, vt.LongType, vt.FloatType, vt.DoubleType, vt.BoolType)
}


def position_key(ingress_id: str, topic: str, partition: int) -> str:
    """The key of a partition's position in a checkpoint part: ``kafka|<ingress id>|<topic>|<partition>``."""
    return f"kafka|{ingress_id}|{topic}|{partition}"


def _parse_key(key: str) -> tuple[str, str, int] | None:
    parts = key.split("|")
    if len(parts) != 4 or parts[0] != "kafka" or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def client_error(what: str, err: Any, last: list[float]) -> None:
    """Log a client error reported by librdkafka's error_cb, at most one per 5 s (``last[0]``:
    the time of the previous one). Called from whichever thread polls the client."""
    now = time.monotonic()
    if now - last[0] >= 5.0:
        last[0] = now
        log.warning("%s: client error: %s (retrying)", what, err)


def _import_kafka() -> Any:
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    return confluent_kafka


class KafkaIngress(ClientTasks):
    """The Kafka ingresses of one peer (one consumer per ingress component)."""

    def __init__(self, peer: Peer, specs: list[KafkaIngressSpec]) -> None:
        super().__init__()
        self.peer = peer
        self.specs = specs
        for spec in specs:
            for t in spec.topics:
                for target in t.targets:
                    if target not in peer.table and not peer.is_remote(target):
                        raise ConfigError(
                            f"Kafka ingress {spec.id}: topic {t.topic} targets {target}, which is neither bound "
                            "locally nor served by an endpoint of the module file",
                            key="module",
                        )
        _import_kafka()  # a missing client fails at construction, not later in a task
        #: position key -> the next offset to route (this peer's partitions only)
        self.positions: dict[str, int] = {}
        #: bumped by :meth:`restore`: a consumer seeks again when it changes
        self.epoch = 0
        self.routed = 0
        self.dead_lettered = 0
        #: the newest dead letters: (topic, partition, offset, reason)
        self.dead_letters: deque[tuple[str, int, int, str]] = deque(maxlen=100)
        #: partitions each ingress reads now: ingress id -> [(topic, partition)]
        self.assigned: dict[str, list[tuple[str, int]]] = {}
        self._consumers: dict[str, Any] = {}
        self._tlog = ThrottledLog(log)
        self._last_client_error: list[float] = [0.0]

    # -- hooks the peer and its checkpoint participant call --------------------------------

    def snapshot_positions(self) -> dict[str, int]:
        """The positions at a checkpoint's cut (called between batches, on the event loop)."""
        return dict(self.positions)

    def restore(self, positions: dict[str, int]) -> None:
        """Take the positions of a restored checkpoint (every part's: a rescale moves partitions)."""
        n, me = self.peer.n_peers, self.peer.peer_id
        mine = {}
        for k, v in positions.items():
            parsed = _parse_key(k)
            if parsed is not None and parsed[2] % n == me:
                mine[k] = v
        self.positions = mine
        self.epoch += 1

    def on_checkpoint(self, positions: dict[str, int]) -> None:
        """A checkpoint completed: commit its positions to the consumer groups (monitoring only)."""
        confluent_kafka = _import_kafka()
        for spec in self.specs:
            consumer = self._consumers.get(spec.id)
            offsets = []
            for k, v in positions.items():
                parsed = _parse_key(k)
                if parsed is not None and parsed[0] == spec.id:
                    offsets.append(confluent_kafka.TopicPartition(parsed[1], parsed[2], v))
            if consumer is not None and offsets:
                try:
                    consumer.commit(offsets=offsets, asynchronous=True)
                except Exception as exc:  # monitoring only: the checkpoint holds the positions
                    self._tlog.warning(
                        "kafka group commits",
                        "kafka ingress %s: committing offsets to group %s failed: %s",
                        spec.id,
                        spec.group_id,
                        exc,
                    )

    def status(self) -> dict[str, Any]:
        """For ``Peer.status()``: records routed, dead letters, and each partition's position."""
        return {
            "routed": self.routed,
            "dead_letters": self.dead_lettered,
            "last_dead_letters": [list(x) for x in list(self.dead_letters)[-5:]],
            "positions": dict(sorted(self.positions.items())),
        }

    def start(self) -> None:
        """Start the consumers (they wait until the peer admits input)."""
        for spec in self.specs:
            self._start_task(self._run(spec), f"kafka ingress {spec.id}")

    async def aclose(self) -> None:
        """Stop consuming and close the consumers."""
        if not await self._stop_tasks(30.0):  # a client call hangs: leave its client open rather than crash
            log.warning("kafka ingress: a client call did not return within 30 s; its consumer is not closed")
            self._consumers = {}
            return
        for consumer in self._consumers.values():
            with contextlib.suppress(Exception):
                await self._call(consumer.close)
        self._consumers = {}

    # -- consuming ---------------------------------------------------------------------------

    def _config(self, spec: KafkaIngressSpec) -> dict[str, Any]:
        conf: dict[str, Any] = dict(spec.properties)
        conf.update(
            {
                "bootstrap.servers": spec.address,
                "group.id": spec.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": spec.auto_offset_reset,
                "allow.auto.create.topics": False,
                "client.id": conf.get("client.id", f"statefun-mesh-peer-{self.peer.peer_id}"),
                "error_cb": lambda err, spec=spec: self._on_error(spec, err),
            }
        )
        conf.setdefault("isolation.level", "read_committed")
        # librdkafka's own log lines (stderr) would repeat a refused connection every few ms:
        # its errors come through error_cb instead, at most one line per 5 s
        conf.setdefault("log_level", 0)
        return conf

    def _on_error(self, spec: KafkaIngressSpec, err: Any) -> None:
        client_error(f"kafka ingress {spec.id} at {spec.address}", err, self._last_client_error)

    async def _run(self, spec: KafkaIngressSpec) -> None:
        confluent_kafka = _import_kafka()
        peer = self.peer
        pause = 0.2
        assigned_epoch = -1
        next_metadata = 0.0
        consumer = None
        while not self._closing and not peer.closing:
            try:
                await peer.admit()
                if consumer is None:
                    consumer = confluent_kafka.Consumer(self._config(spec))
                    self._consumers[spec.id] = consumer
                now = time.monotonic()
                if assigned_epoch != self.epoch or now >= next_metadata:
                    epoch = self.epoch
                    await self._assign(spec, consumer, confluent_kafka)
                    if epoch != self.epoch:
                        continue
                    assigned_epoch, next_metadata = epoch, now + METADATA_EVERY
                if not self.assigned.get(spec.id):
                    await asyncio.sleep(min(1.0, max(0.0, next_metadata - time.monotonic())))
                    continue
                epoch, gen = self.epoch, peer.generation
                msgs = await self._call(consumer.consume, POLL_BATCH, POLL_WAIT)
                if epoch != self.epoch or gen != peer.generation or not peer.resumed or self._closing:
                    assigned_epoch = -1  # a recovery began or ended meanwhile: seek to the positions again
                    continue
                self._route(spec, msgs, confluent_kafka)
                pause = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing or peer.closing:
                    return
                self._tlog.error(
                    "kafka ingress errors",
                    "kafka ingress %s at %s: %s; retrying in %.1f s",
                    spec.id,
                    spec.address,
                    exc,
                    pause,
                )
                assigned_epoch = -1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
            finally:
                self._tlog.flush()

    async def _assign(self, spec: KafkaIngressSpec, consumer: Any, ck: Any) -> None:
        """Assign this peer's partitions at their positions (resolving the start of new ones)."""
        n, me = self.peer.n_peers, self.peer.peer_id
        wanted: list[tuple[str, int]] = []
        for t in spec.topics:
            md = await self._call(consumer.list_topics, t.topic, 5.0)
            tmd = md.topics.get(t.topic)
            if tmd is None or tmd.error is not None or not tmd.partitions:
                why = tmd.error if tmd is not None and tmd.error is not None else "no such topic"
                self._tlog.error(
                    "kafka missing topics",
                    "kafka ingress %s: topic %s at %s is not readable (%s); "
                    "its records are read once it is (checked every %.0f s)",
                    spec.id,
                    t.topic,
                    spec.address,
                    why,
                    METADATA_EVERY,
                )
                continue
            wanted += [(t.topic, p) for p in sorted(tmd.partitions) if p % n == me]
        starts = {}
        new = [tp for tp in wanted if position_key(spec.id, *tp) not in self.positions]
        if new:
            starts = await self._call(self._resolve, spec, consumer, ck, new)
        for tp, offset in starts.items():
            self.positions.setdefault(position_key(spec.id, *tp), offset)
        tps = [ck.TopicPartition(t, p, self.positions[position_key(spec.id, t, p)]) for t, p in wanted]
        await self._call(consumer.assign, tps)
        if wanted != self.assigned.get(spec.id):
            log.info(
                "kafka ingress %s: peer %d reads %s",
                spec.id,
                me,
                ", ".join(f"{t}/{p}@{self.positions[position_key(spec.id, t, p)]}" for t, p in wanted)
                or "no partition",
            )
        self.assigned[spec.id] = wanted

    @staticmethod
    def _resolve(spec: KafkaIngressSpec, consumer: Any, ck: Any, tps: list[tuple[str, int]]) -> dict[Any, int]:
        """The concrete start offset of partitions this mesh never read (startupPosition)."""
        out: dict[Any, int] = {}
        marks = {}
        for tp in tps:
            marks[tp] = consumer.get_watermark_offsets(ck.TopicPartition(*tp), timeout=5.0, cached=False)

        def reset(tp: tuple[str, int]) -> int:
            low, high = marks[tp]
            return int(low if spec.auto_offset_reset == "earliest" else high)

        def valid(tp: tuple[str, int], offset: int) -> bool:
            low, high = marks[tp]
            return offset >= 0 and low <= offset <= high

        if spec.startup == "earliest":
            return {tp: int(marks[tp][0]) for tp in tps}
        if spec.startup == "latest":
            return {tp: int(marks[tp][1]) for tp in tps}
        if spec.startup == "group-offsets":
            committed = consumer.committed([ck.TopicPartition(*tp) for tp in tps], timeout=10.0)
            for c in committed:
                tp = (c.topic, c.partition)
                out[tp] = c.offset if valid(tp, c.offset) else reset(tp)
            return out
        if spec.startup == "specific-offsets":
            for tp in tps:
                offset = spec.specific_offsets.get(tp, -1)
                out[tp] = offset if valid(tp, offset) else reset(tp)
            return out
        assert spec.date_ms is not None
        found = consumer.offsets_for_times([ck.TopicPartition(t, p, spec.date_ms) for t, p in tps], timeout=10.0)
        for c in found:
            tp = (c.topic, c.partition)
            out[tp] = c.offset if valid(tp, c.offset) else reset(tp)
        return out

    def _route(self, spec: KafkaIngressSpec, msgs: list[Any], ck: Any) -> None:
        """Route the polled records and advance the positions: one synchronous step (see the module doc)."""
        peer = self.peer
        records = []
        positions = self.positions
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != ck.KafkaError._PARTITION_EOF:
                    self._tlog.error("kafka consume errors", "kafka ingress %s at %s: %s", spec.id, spec.address, err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            key = position_key(spec.id, topic, partition)
            if offset < positions.get(key, 0):
                continue  # already routed (a fetch from before a seek)
            positions[key] = offset + 1
            t = spec.topic(topic)
            reason = self._check(t.value_type, msg.key(), msg.value())
            if reason is None:
                target_id = msg.key().decode("utf-8")
                value = msg.value()
                recs = [(target, target_id, "", "", t.value_type, value, 0, 0) for target in t.targets]
                try:
                    for rec in recs:
                        peer.check_message(rec, "Kafka record")
                except MessageTooLargeError as exc:
                    reason = str(exc)
                else:
                    records += recs
                    continue
            self.dead_lettered += 1
            self.dead_letters.append((topic, partition, offset, reason))
            self._tlog.error(
                "kafka dead letters",
                "kafka ingress %s: dead letter %s/%d@%d skipped: %s",
                spec.id,
                topic,
                partition,
                offset,
                reason,
            )
        if records:
            peer.route_admitted(records)
            self.routed += len(records)

    @staticmethod
    def _check(value_type: str, key: bytes | None, value: bytes | None) -> str | None:
        """Why a record cannot become messages, or ``None``."""
        if key is None or not key:
            return "the record has no key (the key is the target id)"
        try:
            key.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the key {key[:40]!r} is not UTF-8 ({exc.reason} at byte {exc.start}); the key is the target id"
        if value is None:
            return "the record has no value (a tombstone)"
        primitive = _PRIMITIVES.get(value_type)
        if primitive is not None:
            try:
                primitive.serializer().deserialize(value)
            except Exception as exc:
                return f"the value {value[:40]!r} is not a {value_type} value ({exc!r})"
        return None
