"""The Kafka egress of ``module.yaml`` (``io.statefun.kafka.v1/egress``), run inside the peers.

Functions write ``kafka_egress_message(typename=<egress id>, topic=..., key=..., value=...)``;
the records go to the peer's egress log of that typename, and are *released* when the
checkpoint that contains them completes (the mesh's transactional egress). Each peer runs one
producer per egress component that produces its released records, in offset order, from its
*produced position* ``P`` (the next egress offset to produce) on. ``P`` is kept in Kafka, in
the compacted topic ``statefun-mesh-egress-progress`` (key ``<egress id>/<peer>``), and read
back (read_committed) when the peer starts.

- ``exactly-once``: one Kafka transaction per released range, holding its records *and* the
  new ``P``; ``transactional.id`` = ``statefun-mesh/<egress id>/<peer>``, stable across
  restarts, so a restarted producer fences its predecessor and aborts its open transaction.
  A SIGKILL between produce and commit neither loses nor duplicates what read_committed
  consumers see. This needs a broker that implements transactions fully (Apache Kafka does;
  Tansu, the broker of our tests, does not hide aborted records: docs/connectors.md).
- ``at-least-once``: the records are produced (idempotent producer) and acknowledged, then
  ``P`` is written: a crash in between produces the last range again.
- ``none``: as ``at-least-once``; nothing more is promised.

Every record carries the header ``statefun-mesh-id`` = ``<egress id>/<peer>/<offset>``, the
same for every copy of it, so a consumer of an at-least-once egress can drop duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

from ..errors import ConfigError
from ..logutil import ThrottledLog
from .kafka import _import_kafka, client_error
from .kafka_spec import KafkaEgressSpec
from .workers import ClientTasks

if TYPE_CHECKING:
    from ..peer import Peer

__all__ = ["HEADER_ID", "PROGRESS_TOPIC", "KafkaEgress"]

log = logging.getLogger("statefun_mesh.kafka")

PROGRESS_TOPIC: Final = "statefun-mesh-egress-progress"
HEADER_ID: Final = "statefun-mesh-id"
#: records per produced range (one transaction), at most
BATCH: Final = 1000


class KafkaEgress(ClientTasks):
    """The Kafka egresses of one peer (one producer per egress component)."""

    def __init__(self, peer: Peer, specs: list[KafkaEgressSpec]) -> None:
        super().__init__()
        self.peer = peer
        self.specs = specs
        _import_kafka()
        immediate = [s.id for s in specs if s.id in peer.config.egress_immediate]
        if immediate:
            raise ConfigError(
                f"Kafka egress {immediate[0]} is listed in egress_immediate: its offsets are reused "
                "after a recovery, so its produced position would skip records; remove it from "
                "egress_immediate (the Kafka egress produces released records)",
                key="egress_immediate",
            )
        if not peer.checkpointing and any(s.semantic == "exactly-once" for s in specs):
            log.warning(
                "peer %d: Kafka egress %s is exactly-once, but checkpoints are off: records are released "
                "as they are written and a crash loses state anyway",
                peer.peer_id,
                next(s.id for s in specs if s.semantic == "exactly-once"),
            )
        #: egress id -> the next egress offset to produce (this peer's log)
        self.produced: dict[str, int] = {}
        self.records_out = 0
        self.transactions = 0
        self._producers: dict[str, Any] = {}
        self._tlog = ThrottledLog(log)
        self._last_client_error: list[float] = [0.0]

    def status(self) -> dict[str, Any]:
        """For ``Peer.status()``: records produced, transactions, and each egress's produced position."""
        return {"records": self.records_out, "transactions": self.transactions, "produced": dict(self.produced)}

    def start(self) -> None:
        for spec in self.specs:
            self._start_task(self._run(spec), f"kafka egress {spec.id}")

    async def aclose(self) -> None:
        if not await self._stop_tasks(90.0):  # a client call hangs: keep its producer rather than crash
            log.warning("kafka egress: a client call did not return within 90 s; its producer is not closed")
            return
        for p in self._producers.values():
            with contextlib.suppress(Exception):
                await self._call(p.flush, 5.0)
        self._producers = {}

    # -- one egress ------------------------------------------------------------------------

    def _progress_key(self, spec: KafkaEgressSpec) -> str:
        return f"{spec.id}/{self.peer.peer_id}"

    def _producer_config(self, spec: KafkaEgressSpec) -> dict[str, Any]:
        conf: dict[str, Any] = dict(spec.properties)
        conf.update(
            {
                "bootstrap.servers": spec.address,
                "enable.idempotence": True,
                "error_cb": lambda err: client_error(
                    f"kafka egress {spec.id} at {spec.address}", err, self._last_client_error
                ),
            }
        )
        conf.setdefault("log_level", 0)  # errors come through error_cb (see kafka.py)
        conf.setdefault("linger.ms", 5)
        if spec.semantic == "exactly-once":
            conf["transactional.id"] = f"statefun-mesh/{spec.id}/{self.peer.peer_id}"
            conf["transaction.timeout.ms"] = int(spec.transaction_timeout * 1000)
        return conf

    def _read_progress(self, spec: KafkaEgressSpec, ck: Any) -> int:
        """The produced position in the progress topic (read_committed), 0 if none (blocking)."""
        admin = ck.admin.AdminClient({"bootstrap.servers": spec.address, "log_level": 0})
        md = admin.list_topics(timeout=10.0)
        if PROGRESS_TOPIC not in md.topics:
            fut = admin.create_topics([ck.admin.NewTopic(PROGRESS_TOPIC, 1, 1, config={"cleanup.policy": "compact"})])
            for f in fut.values():
                try:
                    f.result(10.0)
                except ck.KafkaException as exc:
                    if exc.args[0].code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
        # Read to a marker written now: everything an earlier incarnation of this producer wrote
        # (fenced and its transaction finished by init_transactions) is before it in the
        # partition, and records of other peers written meanwhile do not keep the read going.
        # (End offsets are not used: Tansu reports them wrongly.)
        marker = f"{self._progress_key(spec)}#{uuid.uuid4().hex}".encode()
        plain = ck.Producer({"bootstrap.servers": spec.address, "enable.idempotence": True, "log_level": 0})
        plain.produce(PROGRESS_TOPIC, key=marker, value=None, partition=0)  # a tombstone: compaction drops it
        if plain.flush(30.0):
            raise ck.KafkaException(ck.KafkaError(ck.KafkaError._TIMED_OUT, "writing the progress marker timed out"))
        consumer = ck.Consumer(
            {
                "bootstrap.servers": spec.address,
                "group.id": f"statefun-mesh-progress-{spec.id}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "log_level": 0,
            }
        )
        key = self._progress_key(spec).encode()
        position = 0
        try:
            consumer.assign([ck.TopicPartition(PROGRESS_TOPIC, 0, ck.OFFSET_BEGINNING)])
            deadline = time.monotonic() + 60.0
            while True:
                if time.monotonic() > deadline:
                    raise ck.KafkaException(
                        ck.KafkaError(ck.KafkaError._TIMED_OUT, f"reading {PROGRESS_TOPIC} to its end took over 60 s")
                    )
                for m in consumer.consume(1000, 0.2):
                    if m.error() is not None:
                        continue
                    if m.key() == marker:
                        return position
                    if m.key() == key and m.value():
                        position = max(position, int(json.loads(m.value())["next"]))
        finally:
            consumer.close()

    async def _run(self, spec: KafkaEgressSpec) -> None:
        ck = _import_kafka()
        import confluent_kafka.admin  # noqa: F401 - ck.admin

        peer = self.peer
        pause = 0.2
        producer = None
        while not self._closing and not peer.closing:
            try:
                if producer is None:
                    producer = ck.Producer(self._producer_config(spec))
                    if spec.semantic == "exactly-once":
                        # fences an earlier incarnation of this peer and aborts its open transaction
                        await self._call(producer.init_transactions, 30.0)
                    self._producers[spec.id] = producer
                    self.produced[spec.id] = await self._call(self._read_progress, spec, ck)
                    log.info(
                        "kafka egress %s: peer %d produces from egress offset %d (%s)",
                        spec.id,
                        peer.peer_id,
                        self.produced[spec.id],
                        spec.semantic,
                    )
                pos = self.produced[spec.id]
                records = peer.egress_read(spec.id, pos, BATCH) if peer.resumed and not peer.closing else []
                if not records:
                    # egress_wait returns at once while the peer closes, or when the head is past
                    # pos with nothing readable (recovering): never loop without suspending
                    if peer.resumed and not peer.closing:
                        await peer.egress_wait(spec.id, pos, 1.0)
                    await asyncio.sleep(0.01 if peer.resumed else 0.1)
                    continue
                if records[0].offset > pos:
                    self._tlog.error(
                        "kafka egress trimmed",
                        "kafka egress %s: peer %d trimmed records %d..%d "
                        "before they were produced (egress_retention): they are lost",
                        spec.id,
                        peer.peer_id,
                        pos,
                        records[0].offset - 1,
                    )
                await self._call(self._produce, spec, producer, records, ck)
                self.produced[spec.id] = records[-1].offset + 1
                self.records_out += len(records)
                pause = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing or peer.closing:
                    return
                self._tlog.error(
                    "kafka egress errors",
                    "kafka egress %s at %s: %s; retrying in %.1f s",
                    spec.id,
                    spec.address,
                    exc,
                    pause,
                )
                if producer is not None and spec.semantic == "exactly-once":
                    fatal = isinstance(exc, ck.KafkaException) and exc.args[0].fatal()
                    if not fatal:
                        with contextlib.suppress(Exception):
                            await self._call(producer.abort_transaction, 10.0)
                    if fatal:  # fenced or broken: a new producer reads the progress again
                        self._producers.pop(spec.id, None)
                        producer = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
            finally:
                self._tlog.flush()

    def _produce(self, spec: KafkaEgressSpec, producer: Any, records: list[Any], ck: Any) -> None:
        """Produce one released range and the new position (blocking; a thread)."""
        errors: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        exactly = spec.semantic == "exactly-once"
        if exactly:
            producer.begin_transaction()
        for rec in records:
            try:
                k = rec.as_kafka()
            except Exception as exc:
                raise ConfigError(
                    f"egress {spec.id} record {rec.peer}/{rec.offset} is not a kafka_egress_message "
                    f"record ({rec.value_typename()}): {exc}"
                ) from None
            headers = [(HEADER_ID, f"{spec.id}/{rec.peer}/{rec.offset}".encode())]
            while True:
                try:
                    producer.produce(
                        k.topic,
                        value=k.value,
                        key=k.key.encode() if k.key else None,
                        headers=headers,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
        progress = json.dumps({"next": records[-1].offset + 1, "at": int(time.time() * 1000)}).encode()
        if exactly:
            producer.produce(
                PROGRESS_TOPIC, key=self._progress_key(spec).encode(), value=progress, on_delivery=delivered
            )
            producer.commit_transaction(60.0)  # flushes; raises if anything failed
            self.transactions += 1
            if errors:
                raise ck.KafkaException(errors[0])
            return
        if producer.flush(60.0) or errors:
            raise ck.KafkaException(errors[0] if errors else ck.KafkaError(ck.KafkaError._TIMED_OUT))
        producer.produce(PROGRESS_TOPIC, key=self._progress_key(spec).encode(), value=progress, on_delivery=delivered)
        if producer.flush(30.0) or errors:
            raise ck.KafkaException(errors[0] if errors else ck.KafkaError(ck.KafkaError._TIMED_OUT))
