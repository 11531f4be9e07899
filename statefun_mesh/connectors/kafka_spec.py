"""StateFun 3.3's Kafka components of ``module.yaml``: what they say, checked.

Two kinds, spelled as StateFun documents them::

    kind: io.statefun.kafka.v1/ingress
    spec:
      id: com.example/users                    # the ingress's name (namespace/name)
      address: kafka-broker:9092               # bootstrap servers, comma-separated
      consumerGroupId: my-consumer-group
      startupPosition: {type: earliest}        # group-offsets (default), earliest, latest,
                                               # specific-offsets {offsets}, date {date}
      autoOffsetResetPosition: latest          # where a partition without a usable start offset starts
      topics:
        - topic: messages-1
          valueType: com.example/User
          targets: [com.example.fns/greeter]
      properties:                              # Kafka client properties (a list of one-key maps,
        - client.id: my-client                 #   as StateFun writes them, or one mapping)

    kind: io.statefun.kafka.v1/egress
    spec:
      id: com.example/out
      address: kafka-broker:9092
      deliverySemantic: {type: exactly-once, transactionTimeout: 15min}   # at-least-once, none
      properties: [...]

The named settings win over ``properties`` (as in StateFun). Every problem is a
:class:`~statefun_mesh.errors.ConfigError` naming the document and the key.
This module only parses; :mod:`statefun_mesh.connectors.kafka` runs the ingress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

from ..address import parse_typename
from ..durations import parse_duration
from ..errors import ConfigError

__all__ = [
    "KAFKA_EGRESS",
    "KAFKA_INGRESS",
    "KafkaEgressSpec",
    "KafkaIngressSpec",
    "KafkaTopic",
    "parse_kafka_egress",
    "parse_kafka_ingress",
]

KAFKA_INGRESS: Final = "io.statefun.kafka.v1/ingress"
KAFKA_EGRESS: Final = "io.statefun.kafka.v1/egress"

STARTUP_TYPES: Final = ("group-offsets", "earliest", "latest", "specific-offsets", "date")
SEMANTICS: Final = ("exactly-once", "at-least-once", "none")
#: Kafka's topic name rule: 1-249 of [a-zA-Z0-9._-], not "." or ".."
_TOPIC_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_INGRESS_KEYS: Final = frozenset(
    {"id", "address", "consumerGroupId", "startupPosition", "autoOffsetResetPosition", "topics", "properties"}
)
_EGRESS_KEYS: Final = frozenset({"id", "address", "deliverySemantic", "properties"})


@dataclass(frozen=True, slots=True)
class KafkaTopic:
    """One topic of an ingress: its records' value type and the function types they go to."""

    topic: str
    value_type: str
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KafkaIngressSpec:
    """An ``io.statefun.kafka.v1/ingress`` component.

    Attributes:
        id: the ingress's typename.
        address: bootstrap servers (``host:port[,host:port...]``).
        group_id: the consumer group (statefun_mesh commits the checkpointed offsets to it,
            for monitoring, and reads them for ``group-offsets``).
        topics: the topics, each with its value type and targets.
        startup: one of :data:`STARTUP_TYPES`.
        specific_offsets: ``(topic, partition) -> offset`` for ``specific-offsets``.
        date_ms: epoch milliseconds for ``date``.
        auto_offset_reset: ``latest`` or ``earliest``: where a partition starts when the
            start offset is missing or out of range.
        properties: further Kafka client properties (strings).
    """

    id: str
    address: str
    group_id: str
    topics: tuple[KafkaTopic, ...]
    startup: str = "group-offsets"
    specific_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    date_ms: int | None = None
    auto_offset_reset: str = "latest"
    properties: dict[str, str] = field(default_factory=dict)

    def topic(self, name: str) -> KafkaTopic:
        """The topic ``name`` of this ingress."""
        return next(t for t in self.topics if t.topic == name)


@dataclass(frozen=True, slots=True)
class KafkaEgressSpec:
    """An ``io.statefun.kafka.v1/egress`` component.

    Attributes:
        id: the egress typename functions name in ``kafka_egress_message(typename=...)``.
        address: bootstrap servers.
        semantic: ``exactly-once``, ``at-least-once`` or ``none``.
        transaction_timeout: seconds (exactly-once), StateFun's default 15 min.
        properties: further Kafka client properties.
    """

    id: str
    address: str
    semantic: str = "at-least-once"
    transaction_timeout: float = 900.0
    properties: dict[str, str] = field(default_factory=dict)


def _fail(at: str, key: str, message: str) -> ConfigError:
    return ConfigError(message, source=at, key=f"spec.{key}")


def _typename(spec: dict[str, Any], key: str, at: str, what: str, path: str = "") -> str:
    value = spec.get(key)
    path = path or key
    if not isinstance(value, str):
        raise _fail(at, path, f"required: {what} as 'namespace/name', e.g. com.example/users")
    try:
        parse_typename(value)
    except ValueError as exc:
        raise _fail(at, path, f"{value!r} is not 'namespace/name': {exc}") from None
    return value


def _address(spec: dict[str, Any], at: str) -> str:
    address = spec.get("address")
    if not isinstance(address, str) or not address.strip():
        raise _fail(at, "address", "required: the Kafka bootstrap servers, e.g. kafka-broker:9092")
    for server in address.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _fail(at, "address", f"{server.strip()!r} in {address!r} is not host:port")
    return ",".join(s.strip() for s in address.split(","))


def _properties(spec: dict[str, Any], at: str) -> dict[str, str]:
    node = spec.get("properties", [])
    items: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        for i, entry in enumerate(node):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise _fail(at, f"properties[{i}]", f"expected one 'name: value' per list item, got {entry!r}")
            items.extend(entry.items())
    else:
        raise _fail(at, "properties", "must be a list of 'name: value' items (or a mapping)")
    out: dict[str, str] = {}
    for k, v in items:
        if not isinstance(k, str) or isinstance(v, (dict, list)) or v is None:
            raise _fail(at, f"properties.{k}", f"a Kafka property is a name and a scalar value, got {k!r}: {v!r}")
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _unknown(spec: dict[str, Any], known: frozenset[str], at: str) -> None:
    extra = sorted(set(spec) - known)
    if extra:
        raise _fail(at, extra[0], f"unknown setting(s) {extra} (known: {sorted(known)})")


def _date_ms(value: Any, at: str) -> int:
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        text = value.strip()
        # StateFun's pattern: "yyyy-MM-dd HH:mm:ss.SSS Z", e.g. "2020-02-01 04:15:00.00 Z" or "... +01:00"
        text = re.sub(r"\s*Z$", "+00:00", text)
        text = re.sub(r"\s+([+-]\d\d:?\d\d)$", r"\1", text)
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise _fail(
                at, "startupPosition.date", f"{value!r} is not a date like '2020-02-01 04:15:00.00 Z'"
            ) from None
    else:
        raise _fail(at, "startupPosition.date", f"expected a date like '2020-02-01 04:15:00.00 Z', got {value!r}")
    if dt.tzinfo is None:
        raise _fail(at, "startupPosition.date", f"{value!r} needs a time zone (e.g. 'Z' or '+01:00')")
    return int(dt.astimezone(timezone.utc).timestamp() * 1000)


def parse_kafka_ingress(spec: dict[str, Any], at: str) -> KafkaIngressSpec:
    """The :class:`KafkaIngressSpec` of an ingress component's ``spec`` (``at`` names it in errors)."""
    _unknown(spec, _INGRESS_KEYS, at)
    ingress_id = _typename(spec, "id", at, "the ingress id")
    address = _address(spec, at)
    group = spec.get("consumerGroupId")
    if not isinstance(group, str) or not group:
        raise _fail(at, "consumerGroupId", "required: the Kafka consumer group id")
    topics_node = spec.get("topics")
    if not isinstance(topics_node, list) or not topics_node:
        raise _fail(at, "topics", "required: a list of {topic, valueType, targets}")
    topics: list[KafkaTopic] = []
    for i, t in enumerate(topics_node):
        key = f"topics[{i}]"
        if not isinstance(t, dict):
            raise _fail(at, key, f"expected {{topic, valueType, targets}}, got {t!r}")
        extra = sorted(set(t) - {"topic", "valueType", "targets"})
        if extra:
            raise _fail(at, f"{key}.{extra[0]}", f"unknown setting(s) {extra} (known: topic, valueType, targets)")
        name = t.get("topic")
        if not isinstance(name, str) or not _TOPIC_RE.match(name) or name in (".", ".."):
            raise _fail(at, f"{key}.topic", f"required: a Kafka topic name ([a-zA-Z0-9._-], at most 249), got {name!r}")
        if any(x.topic == name for x in topics):
            raise _fail(at, f"{key}.topic", f"topic {name!r} is listed twice; list all its targets once")
        value_type = _typename(t, "valueType", at, "the records' value type", f"{key}.valueType")
        targets = t.get("targets")
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            raise _fail(at, f"{key}.targets", "required: a list of function types, e.g. [com.example.fns/greeter]")
        for j, target in enumerate(targets):
            try:
                if not isinstance(target, str):
                    raise ValueError("not a string")
                parse_typename(target)
            except ValueError as exc:
                raise _fail(at, f"{key}.targets[{j}]", f"{target!r} is not a function type: {exc}") from None
        topics.append(KafkaTopic(name, value_type, tuple(targets)))

    startup_node = spec.get("startupPosition", {"type": "group-offsets"})
    if not isinstance(startup_node, dict) or not isinstance(startup_node.get("type"), str):
        raise _fail(at, "startupPosition", f"expected {{type: one of {', '.join(STARTUP_TYPES)}}}")
    startup = startup_node["type"]
    if startup not in STARTUP_TYPES:
        raise _fail(
            at, "startupPosition.type", f"unknown startup position {startup!r} (known: {', '.join(STARTUP_TYPES)})"
        )
    specific: dict[tuple[str, int], int] = {}
    date_ms = None
    if startup == "specific-offsets":
        specific = _specific_offsets(startup_node.get("offsets"), at, [t.topic for t in topics])
    elif startup == "date":
        date_ms = _date_ms(startup_node.get("date"), at)
    reset = spec.get("autoOffsetResetPosition", "latest")
    if reset not in ("latest", "earliest"):
        raise _fail(at, "autoOffsetResetPosition", f"must be latest or earliest, got {reset!r}")
    return KafkaIngressSpec(
        id=ingress_id,
        address=address,
        group_id=group,
        topics=tuple(topics),
        startup=startup,
        specific_offsets=specific,
        date_ms=date_ms,
        auto_offset_reset=reset,
        properties=_properties(spec, at),
    )


def _specific_offsets(node: Any, at: str, topics: list[str]) -> dict[tuple[str, int], int]:
    key = "startupPosition.offsets"
    items: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        for entry in node:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise _fail(at, key, f"expected one 'topic/partition: offset' per item, got {entry!r}")
            items.extend(entry.items())
    if not items:
        raise _fail(at, key, "specific-offsets needs offsets: a list of 'topic/partition: offset'")
    out: dict[tuple[str, int], int] = {}
    for k, v in items:
        topic, sep, part = str(k).rpartition("/")
        if not sep or not part.isdigit() or topic not in topics:
            raise _fail(at, key, f"{k!r} is not 'topic/partition' of a topic of this ingress ({', '.join(topics)})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _fail(at, key, f"the offset of {k} must be an integer >= 0, got {v!r}")
        out[(topic, int(part))] = v
    return out


def parse_kafka_egress(spec: dict[str, Any], at: str) -> KafkaEgressSpec:
    """The :class:`KafkaEgressSpec` of an egress component's ``spec``."""

    _unknown(spec, _EGRESS_KEYS, at)
    egress_id = _typename(spec, "id", at, "the egress id")
    address = _address(spec, at)
    node = spec.get("deliverySemantic", {"type": "at-least-once"})
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise _fail(at, "deliverySemantic", f"expected {{type: one of {', '.join(SEMANTICS)}}}")
    semantic = node["type"]
    if semantic not in SEMANTICS:
        raise _fail(
            at, "deliverySemantic.type", f"unknown delivery semantic {semantic!r} (known: {', '.join(SEMANTICS)})"
        )
    extra = sorted(set(node) - {"type", "transactionTimeout", "transactionTimeoutMillis"})
    if extra:
        raise _fail(at, f"deliverySemantic.{extra[0]}", f"unknown setting(s) {extra} (known: type, transactionTimeout)")
    timeout = 900.0
    for k in ("transactionTimeout", "transactionTimeoutMillis"):
        if k in node:
            if semantic != "exactly-once":
                raise _fail(at, f"deliverySemantic.{k}", f"a transaction timeout is for exactly-once, not {semantic}")
            timeout = parse_duration(node[k], key=f"spec.deliverySemantic.{k}", source=at)
    return KafkaEgressSpec(
        id=egress_id, address=address, semantic=semantic, transaction_timeout=timeout, properties=_properties(spec, at)
    )
