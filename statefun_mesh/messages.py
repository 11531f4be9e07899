"""Messages, egress messages and egress records, and their builders (StateFun SDK names)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _speedups
from . import valuetypes as vt
from .address import check_id, parse_typename
from .egress_io import (
    KAFKA_PRODUCER_RECORD_TYPENAME,
    KINESIS_EGRESS_RECORD_TYPENAME,
    KafkaEgressRecord,
    KafkaProducerRecordType,
    KinesisEgressRecord,
    KinesisEgressRecordType,
    _encode_kafka,
    _encode_kinesis,
    _value_bytes,
)

__all__ = [
    "EgressMessage",
    "EgressRecord",
    "Message",
    "TypedValue",
    "egress_message_builder",
    "kafka_egress_message",
    "kinesis_egress_message",
    "message_builder",
    "typed_value_from_kwargs",
]

_PRIMITIVE_KWARGS: dict[str, vt.Type] = {
    "int_value": vt.IntType,
    "float_value": vt.FloatType,
    "long_value": vt.LongType,
    "str_value": vt.StringType,
    "double_value": vt.DoubleType,
    "bool_value": vt.BoolType,
}


_INT_TN, _INT_DESERIALIZE = vt.IntType.typename, vt.IntType.serializer().deserialize
_LONG_TN, _LONG_DESERIALIZE = vt.LongType.typename, vt.LongType.serializer().deserialize
_FLOAT_TN, _FLOAT_DESERIALIZE = vt.FloatType.typename, vt.FloatType.serializer().deserialize
_DOUBLE_TN, _DOUBLE_DESERIALIZE = vt.DoubleType.typename, vt.DoubleType.serializer().deserialize
_BOOL_TN, _BOOL_DESERIALIZE = vt.BoolType.typename, vt.BoolType.serializer().deserialize
_STRING_TN, _STRING_DESERIALIZE = vt.StringType.typename, vt.StringType.serializer().deserialize


class TypedValue:
    """A value as the runtime sees it: its type name and its bytes (StateFun's ``TypedValue``)."""

    __slots__ = ("typename", "value")

    def __init__(self, typename: str, value: bytes) -> None:
        self.typename = typename
        self.value = value

    @property
    def has_value(self) -> bool:
        """Always true: statefun_mesh never sends an empty typed value."""
        return True

    def __repr__(self) -> str:
        return f"TypedValue({self.typename!r}, {self.value!r:.60})"


class _Accessors:
    """The ``is_*``/``as_*`` accessors shared by messages and egress records."""

    __slots__ = ()
    _vt: str
    _v: bytes

    def value_typename(self) -> str:
        """The type name of the value, e.g. ``io.statefun.types/int``."""
        return self._vt

    def raw_value(self) -> bytes:
        """The value's bytes, as its type encoded them."""
        return self._v

    @property
    def typed_value(self) -> TypedValue:
        """The value as a :class:`TypedValue` (StateFun compatibility)."""
        return TypedValue(self._vt, self._v)

    def is_type(self, tpe: vt.Type) -> bool:
        """Whether the value has ``tpe``'s type name."""
        return self._vt == tpe.typename

    def as_type(self, tpe: vt.Type) -> Any:
        """Decode the value with ``tpe``.

        Raises:
            TypeError: the value has a different type name.
        """
        if self._vt != tpe.typename:
            raise TypeError(f"cannot read a value of type {self._vt!r} as {tpe.typename!r}")
        return tpe.serializer().deserialize(self._v)

    def is_int(self) -> bool:
        return self._vt == "io.statefun.types/int"

    def as_int(self) -> int:
        if self._vt == _INT_TN:  # as_type(IntType), without its two calls
            return _INT_DESERIALIZE(self._v)  # type: ignore[no-any-return]
        return self.as_type(vt.IntType)  # type: ignore[no-any-return]

    def is_long(self) -> bool:
        return self._vt == "io.statefun.types/long"

    def as_long(self) -> int:
        if self._vt == _LONG_TN:  # as_type(LongType), without its two calls
            return _LONG_DESERIALIZE(self._v)  # type: ignore[no-any-return]
        return self.as_type(vt.LongType)  # type: ignore[no-any-return]

    def is_float(self) -> bool:
        return self._vt == "io.statefun.types/float"

    def as_float(self) -> float:
        if self._vt == _FLOAT_TN:  # as_type(FloatType), without its two calls
            return _FLOAT_DESERIALIZE(self._v)  # type: ignore[no-any-return]
        return self.as_type(vt.FloatType)  # type: ignore[no-any-return]

    def is_double(self) -> bool:
        return self._vt == "io.statefun.types/double"

    def as_double(self) -> float:
        if self._vt == _DOUBLE_TN:  # as_type(DoubleType), without its two calls
            return _DOUBLE_DESERIALIZE(self._v)  # type: ignore[no-any-return]
        return self.as_type(vt.DoubleType)  # type: ignore[no-any-return]

    def is_bool(self) -> bool:
        return self._vt == "io.statefun.types/bool"

    def as_bool(self) -> bool:
        if self._vt == _BOOL_TN:  # as_type(BoolType), without its two calls
            return _BOOL_DESERIALIZE(self._v)  # type: ignore[no-any-return]
        return self.as_type(vt.BoolType)  # type: ignore[no-any-return]

    def is_string(self) -> bool:
        return self._vt == "io.statefun.types/string"

    def as_string(self) -> str:
        if self._vt == _STRING_TN:  # as_type(StringType), without its two calls
            return _STRING_DESERIALIZE(self._v)  # type: ignore[no-any-return]
        return self.as_type(vt.StringType)  # type: ignore[no-any-return]

    def is_kafka(self) -> bool:
        """Whether the value is a Kafka egress record (from :func:`~statefun_mesh.kafka_egress_message`)."""
        return self._vt == "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"

    def as_kafka(self) -> Any:
        """Decode a Kafka egress record: a :class:`~statefun_mesh.egress_io.KafkaEgressRecord`."""
        return self.as_type(KafkaProducerRecordType)

    def is_kinesis(self) -> bool:
        """Whether the value is a Kinesis egress record (from :func:`~statefun_mesh.kinesis_egress_message`)."""
        return self._vt == "type.googleapis.com/io.statefun.sdk.egress.KinesisEgressRecord"

    def as_kinesis(self) -> Any:
        """Decode a Kinesis egress record: a :class:`~statefun_mesh.egress_io.KinesisEgressRecord`."""
        return self.as_type(KinesisEgressRecordType)


def _from_typed_value(typed_value: Any) -> tuple[str, bytes]:
    """``(typename, bytes)`` of a StateFun ``TypedValue`` (ours or a protobuf one); no value is ``b""``."""
    if typed_value is None:
        raise ValueError("typed_value can not be missing")
    try:
        typename, has_value, value = typed_value.typename, typed_value.has_value, typed_value.value
    except AttributeError:
        raise TypeError(
            f"typed_value must be a TypedValue (typename, has_value, value), got {type(typed_value).__name__}"
        ) from None
    parse_typename(typename)
    return typename, bytes(value) if has_value else b""


class Message(_Accessors):
    """A message to a function instance (build one with :func:`message_builder`).

    As in StateFun, ``Message(target_typename, target_id, typed_value)`` also builds one
    from a ``TypedValue`` (statefun_mesh's, or the request-reply protocol's protobuf one).
    """

    __slots__ = ("_v", "_vt", "target_id", "target_typename")

    def __init__(
        self,
        target_typename: str,
        target_id: str,
        value_typename: Any = None,
        value: bytes | None = None,
        *,
        typed_value: Any = None,
    ) -> None:
        self.target_typename = target_typename
        self.target_id = target_id
        if value is None:  # the StateFun form: a TypedValue, positionally or by keyword
            if not target_typename:
                raise ValueError("target_typename can not be missing")
            if not target_id:
                raise ValueError("target_id can not be missing")
            value_typename, value = _from_typed_value(typed_value if typed_value is not None else value_typename)
        self._vt = value_typename
        self._v = value

    def __repr__(self) -> str:
        return f"Message(to={self.target_typename}/{self.target_id}, type={self._vt!r}, value={self._v!r:.40})"


class EgressMessage(_Accessors):
    """A record for an egress (build one with :func:`egress_message_builder`,
    :func:`~statefun_mesh.kafka_egress_message` or :func:`~statefun_mesh.kinesis_egress_message`).

    As in StateFun, ``EgressMessage(typename, typed_value)`` also builds one from a ``TypedValue``.
    """

    __slots__ = ("_v", "_vt", "typename")

    def __init__(
        self, typename: str, value_typename: Any = None, value: bytes | None = None, *, typed_value: Any = None
    ) -> None:
        if value is None:
            if not typename:
                raise ValueError("typename is missing")
            value_typename, value = _from_typed_value(typed_value if typed_value is not None else value_typename)
        self.typename = typename
        self._vt = value_typename
        self._v = value

    def __repr__(self) -> str:
        return f"EgressMessage(egress={self.typename!r}, type={self._vt!r}, value={self._v!r:.40})"


class EgressRecord(_Accessors):
    """A record read from an egress: its egress, its offset in that egress, and its value.

    Offsets increase by one per record of an egress (per peer that produced it); the
    pair ``(peer, offset)`` identifies a record of a transactional egress (the default).
    A record of an immediate egress (``egress_immediate``) has an ``id``,
    ``"<function type>/<instance id>#<n>"``, that a recovery reproduces: deduplicate by
    it. ``id`` is ``None`` for transactional records.
    """

    __slots__ = ("_v", "_vt", "id", "offset", "peer", "typename")

    def __init__(
        self, typename: str, peer: int, offset: int, value_typename: str, value: bytes, id: str | None = None
    ) -> None:
        self.typename = typename
        self.peer = peer
        self.offset = offset
        self._vt = value_typename
        self._v = value
        self.id = id

    def __repr__(self) -> str:
        rid = f", id={self.id!r}" if self.id is not None else ""
        return (
            f"EgressRecord(egress={self.typename!r}, peer={self.peer}, offset={self.offset}{rid}, "
            f"type={self._vt!r}, value={self._v!r:.40})"
        )


def typed_value_from_kwargs(kwargs: dict[str, Any], what: str = "message") -> tuple[str, bytes]:
    """Encode a value given as StateFun builder keywords.

    Accepts exactly one of ``int_value=``, ``float_value=``, ``long_value=``,
    ``str_value=``, ``double_value=``, ``bool_value=``, or the pair ``value=``,
    ``value_type=``. Returns ``(value_typename, bytes)``.
    """
    if len(kwargs) == 2 and "value" in kwargs and "value_type" in kwargs:
        value, value_type = kwargs["value"], kwargs["value_type"]
    elif len(kwargs) == 1:
        keyword, value = next(iter(kwargs.items()))
        value_type = _PRIMITIVE_KWARGS.get(keyword)
        if value_type is None and keyword not in ("value", "value_type"):
            raise TypeError(
                f"unknown {what} value keyword {keyword!r}; use one of "
                f"{', '.join(_PRIMITIVE_KWARGS)}, or value=..., value_type=..."
            )
    else:
        raise TypeError(
            f"wrong value keywords for a {what}: {sorted(kwargs)}; there must be exactly one of "
            f"{', '.join(_PRIMITIVE_KWARGS)}, or value=..., value_type=..."
        )
    if value is None:
        raise ValueError("value can not be missing")
    if value_type is None:
        raise ValueError(
            "Could not deduce the value type, please specify the type explicitly, "
            "passing value=<the value>, value_type=<the type>"
        )
    if not isinstance(value_type, vt.Type):
        raise TypeError(f"value_type must be a statefun_mesh Type, got {type(value_type).__name__}")
    data = value_type.serializer().serialize(value)
    return value_type.typename, data


def message_builder(target_typename: str, target_id: str, **kwargs: Any) -> Message:
    """Build a message to any function instance (StateFun's ``message_builder``).

    Args:
        target_typename: the target function's type, ``"namespace/name"``.
        target_id: the target instance's id.
        **kwargs: exactly one of ``int_value=``, ``float_value=``, ``long_value=``,
            ``str_value=``, ``double_value=``, ``bool_value=``, or ``value=`` together
            with ``value_type=``.

    Raises:
        ValueError: a malformed type name, an empty id or a missing value.
        TypeError: wrong keywords, or a value its type cannot encode.
    """
    parse_typename(target_typename)
    check_id(target_id)
    value_typename, data = typed_value_from_kwargs(kwargs)
    return Message(target_typename, target_id, value_typename, data)


def egress_message_builder(target_typename: str, value: Any, value_type: vt.Type) -> EgressMessage:
    """Build an egress record for the egress named ``target_typename`` (StateFun's builder)."""
    parse_typename(target_typename)
    if value is None:
        raise ValueError("value can not be missing")
    if not isinstance(value_type, vt.Type):
        raise TypeError(f"value_type must be a statefun_mesh Type, got {type(value_type).__name__}")
    return EgressMessage(target_typename, value_type.typename, value_type.serializer().serialize(value))


def kafka_egress_message(
    typename: str,
    topic: str,
    value: str | bytes | bytearray | int | float | Any,
    value_type: vt.Type | None = None,
    key: str | None = None,
) -> EgressMessage:
    """Build a record for a Kafka egress (StateFun's ``kafka_egress_message``).

    Args:
        typename: the egress, ``"namespace/name"``.
        topic: the destination topic.
        value: the value; with ``value_type`` serialized by it, else a ``str`` (UTF-8),
            ``bytes``/``bytearray``, ``int`` (4 bytes big-endian, Kafka's
            ``IntegerSerializer``) or ``float`` (8 bytes big-endian, ``DoubleSerializer``).
        value_type: the value's type, optional.
        key: the record key, optional.

    Raises:
        ValueError: no topic, no value, or a malformed egress type name.
        TypeError: a value of another type without ``value_type``.
    """
    parse_typename(typename)
    if not topic:
        raise ValueError("A destination Kafka topic is missing")
    if value is None:
        raise ValueError("Missing value")
    record = KafkaEgressRecord(topic=topic, key=key or "", value=_value_bytes(value, value_type, kafka=True))
    return EgressMessage(typename, KAFKA_PRODUCER_RECORD_TYPENAME, _encode_kafka(record))


def kinesis_egress_message(
    typename: str,
    stream: str,
    value: str | bytes | bytearray | Any,
    partition_key: str,
    value_type: vt.Type | None = None,
    explicit_hash_key: str | None = None,
) -> EgressMessage:
    """Build a record for a Kinesis egress (StateFun's ``kinesis_egress_message``).

    Args:
        typename: the egress, ``"namespace/name"``.
        stream: the destination stream.
        value: the value; with ``value_type`` serialized by it, else ``str`` (UTF-8) or bytes.
        partition_key: the partition key.
        value_type: the value's type, optional.
        explicit_hash_key: the explicit hash key, optional.

    Raises:
        ValueError: no stream, no value, no partition key, or a malformed egress type name.
        TypeError: a value of another type without ``value_type``.
    """
    parse_typename(typename)
    if not stream:
        raise ValueError("Missing destination Kinesis stream")
    if value is None:
        raise ValueError("Missing value")
    if partition_key is None:
        raise ValueError("Missing partition key")
    record = KinesisEgressRecord(
        stream=stream,
        partition_key=partition_key,
        explicit_hash_key=explicit_hash_key or "",
        value=_value_bytes(value, value_type, kafka=False),
    )
    return EgressMessage(typename, KINESIS_EGRESS_RECORD_TYPENAME, _encode_kinesis(record))


#: the twin's ``Message``: the specification of the Cython core's extension type, which takes
#: its place (and ``message_builder``'s) when that core is in use, so that there is one
#: ``Message`` class in a process (``isinstance`` and ``Context.send``'s check see the same)
PyMessage = Message
if not TYPE_CHECKING and _speedups.IMPLEMENTATION == "c":
    from . import _speedups_c

    _speedups_c.bind_messages(_Accessors, _from_typed_value, vt.IntType, vt.LongType)
    Message = _speedups_c.Message
