"""Kafka and Kinesis egress records: their wire format and their decoded form.

This module owns the record format; the builders ``kafka_egress_message`` and
``kinesis_egress_message`` are in messages.py (with the other message builders, so
that this module does not import messages.py, which decodes with it). They build the same bytes as the
official SDK: an :class:`~statefun_mesh.EgressMessage` whose value is StateFun's
``io.statefun.sdk.egress.KafkaProducerRecord`` (``key = 1``, ``value_bytes = 2``,
``topic = 3``) or ``KinesisEgressRecord`` (``partition_key = 1``, ``value_bytes = 2``,
``stream = 3``, ``explicit_hash_key = 4``), proto3, under the type names
``type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord`` and
``...KinesisEgressRecord``. A record read back from the mesh's egress decodes with
``record.as_kafka()`` / ``record.as_kinesis()`` (or ``as_type(KafkaProducerRecordType)``)
into :class:`KafkaEgressRecord` / :class:`KinesisEgressRecord`.

The mesh stores these records like any other egress record; producing them to Kafka or
Kinesis is a connector's job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from . import valuetypes as _vt

__all__ = [
    "KAFKA_PRODUCER_RECORD_TYPENAME",
    "KINESIS_EGRESS_RECORD_TYPENAME",
    "KafkaEgressRecord",
    "KafkaProducerRecordType",
    "KinesisEgressRecord",
    "KinesisEgressRecordType",
]

KAFKA_PRODUCER_RECORD_TYPENAME: Final = "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"
KINESIS_EGRESS_RECORD_TYPENAME: Final = "type.googleapis.com/io.statefun.sdk.egress.KinesisEgressRecord"


@dataclass(frozen=True, slots=True)
class KafkaEgressRecord:
    """A Kafka egress record as a function produced it.

    Attributes:
        topic: the destination topic.
        key: the record key (``""`` when the function gave none: proto3 cannot tell them apart).
        value: the record value's bytes (already serialized by the builder).
    """

    topic: str
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class KinesisEgressRecord:
    """A Kinesis egress record as a function produced it.

    Attributes:
        stream: the destination stream.
        partition_key: the partition key.
        explicit_hash_key: the explicit hash key (``""`` when none was given).
        value: the record value's bytes.
    """

    stream: str
    partition_key: str
    explicit_hash_key: str
    value: bytes


# -- proto3 encoding of messages made only of string/bytes fields -----------------------------


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited field; proto3 omits an empty one."""
    if not data:
        return b""
    return _vt._encode_varint(number << 3 | 2) + _vt._encode_varint(len(data)) + data


def _utf8(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {exc.reason} at {exc.start}") from None


def _parse_len_fields(data: bytes, typename: str, numbers: int) -> list[bytes]:
    """The last value of each length-delimited field 1..``numbers``; others skipped as protobuf does."""
    data = _vt._as_bytes(data, typename)
    found = [b""] * (numbers + 1)
    n = len(data)
    pos = 0
    while pos < n:
        field, wt, start = _vt._read_tag(data, pos, typename)
        if wt == _vt._WT_START_GROUP:
            pos = _vt._skip_group(data, start, field, typename)
            continue
        if wt == _vt._WT_END_GROUP:
            raise _vt._malformed(typename, f"end-group tag of field {field} at byte {pos} without a start-group tag")
        pos = _vt._skip_value(data, start, wt, typename)
        if wt == _vt._WT_LEN and field <= numbers:
            _, body = _vt._read_varint(data, start, _vt._MAX_TAG_BYTES, typename, "length")
            found[field] = data[body:pos]
    return found


def _text(raw: bytes, typename: str, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _vt._malformed(typename, f"{field} is not valid UTF-8 ({exc.reason})") from None


def _encode_kafka(record: KafkaEgressRecord) -> bytes:
    return (
        _field(1, _utf8(record.key, "key")) + _field(2, bytes(record.value)) + _field(3, _utf8(record.topic, "topic"))
    )


def _decode_kafka(data: bytes) -> KafkaEgressRecord:
    t = KAFKA_PRODUCER_RECORD_TYPENAME
    f = _parse_len_fields(data, t, 3)
    return KafkaEgressRecord(topic=_text(f[3], t, "topic"), key=_text(f[1], t, "key"), value=f[2])


def _encode_kinesis(record: KinesisEgressRecord) -> bytes:
    return (
        _field(1, _utf8(record.partition_key, "partition_key"))
        + _field(2, bytes(record.value))
        + _field(3, _utf8(record.stream, "stream"))
        + _field(4, _utf8(record.explicit_hash_key, "explicit_hash_key"))
    )


def _decode_kinesis(data: bytes) -> KinesisEgressRecord:
    t = KINESIS_EGRESS_RECORD_TYPENAME
    f = _parse_len_fields(data, t, 4)
    return KinesisEgressRecord(
        stream=_text(f[3], t, "stream"),
        partition_key=_text(f[1], t, "partition_key"),
        explicit_hash_key=_text(f[4], t, "explicit_hash_key"),
        value=f[2],
    )


def _checked(cls: type, encode: Any) -> Any:
    def serialize(value: Any) -> bytes:
        if not isinstance(value, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(value).__name__}")
        return encode(value)  # type: ignore[no-any-return]

    return serialize


#: The type of Kafka egress records: values are :class:`KafkaEgressRecord`.
KafkaProducerRecordType: Final = _vt.simple_type(
    KAFKA_PRODUCER_RECORD_TYPENAME, _checked(KafkaEgressRecord, _encode_kafka), _decode_kafka
)
#: The type of Kinesis egress records: values are :class:`KinesisEgressRecord`.
KinesisEgressRecordType: Final = _vt.simple_type(
    KINESIS_EGRESS_RECORD_TYPENAME, _checked(KinesisEgressRecord, _encode_kinesis), _decode_kinesis
)


def _value_bytes(value: Any, value_type: _vt.Type | None, kafka: bool) -> bytes:
    """The record value's bytes, as the official SDK derives them."""
    if value_type:
        out = value_type.serializer().serialize(value)
        return _vt._check_bytes_result(out, value_type.typename, "serialize")
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if kafka and isinstance(value, int):
        # Kafka's IntegerSerializer: 4 bytes big-endian
        try:
            return struct.pack(">i", value)
        except struct.error:
            raise ValueError(
                f"int value {value} does not fit Kafka's 32-bit IntegerSerializer; pass value_type"
            ) from None
    if kafka and isinstance(value, float):
        return struct.pack(">d", value)  # Kafka's DoubleSerializer
    raise TypeError(f"Unable to convert value to bytes: {type(value).__name__}; pass value_type")
