"""Value types: StateFun's ``Type``/``TypeSerializer``, its primitive wrapper types, JSON and msgpack.

Why above ~500 lines: one module owns every value encoding: the six primitive wrappers,
byte-compatible with StateFun's protobuf (with the bounded protobuf reader they share),
and the JSON and msgpack types; splitting them would scatter one wire contract.
"""

from __future__ import annotations

import abc
import json
import operator
import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack

from .errors import TypeNameError

__all__ = [
    "BoolType",
    "DoubleType",
    "FloatType",
    "IntType",
    "LongType",
    "MsgPackType",
    "PY_TYPE_TO_WRAPPER_TYPE",
    "StringType",
    "Type",
    "TypeSerializer",
    "WRAPPER_TYPE_TO_PY_TYPE",
    "make_json_type",
    "make_msgpack_type",
    "make_protobuf_type",
    "simple_type",
    "type_of_value",
]


# ---------------------------------------------------------------------------------------------
# The abstract API (StateFun SDK ``statefun.core``)
# ---------------------------------------------------------------------------------------------


class TypeSerializer(abc.ABC):
    """Turns values of one :class:`Type` into bytes and back.

    ``serialize`` and ``deserialize`` run once per message or state access, so
    implementations keep them cheap and free of per-call setup.
    """

    __slots__ = ()

    @abc.abstractmethod
    def serialize(self, value: Any) -> bytes:
        """Encode ``value``.

        Args:
            value: a value of this serializer's type.

        Returns:
            The value's bytes.

        Raises:
            TypeError: ``value`` is of a Python type this serializer cannot encode.
            ValueError: ``value`` has the right type but cannot be encoded (out of range, ...).
        """

    @abc.abstractmethod
    def deserialize(self, data: bytes) -> Any:
        """Decode bytes produced by :meth:`serialize` (or by any StateFun SDK for this type).

        Args:
            data: the encoded value.

        Returns:
            The decoded value.

        Raises:
            ValueError: ``data`` is not a valid encoding of this type.
        """


class Type(abc.ABC):
    """A StateFun value type: a type name plus the serializer for its values.

    Type names have the form ``"namespace/name"``; they are split at the last ``/``, so
    the namespace may contain dots and slashes (``io.statefun.types/int``).

    Attributes:
        typename: this type's name, e.g. ``"io.statefun.types/int"``.
    """

    __slots__ = ("typename",)

    def __init__(self, typename: str) -> None:
        """Validate and store the type name.

        Raises:
            TypeError: ``typename`` is not a ``str``.
            TypeNameError: (a ``ValueError``) ``typename`` is not ``"namespace/name"``
                with both parts non-empty.
        """
        _check_typename(typename)
        self.typename = typename

    @abc.abstractmethod
    def serializer(self) -> TypeSerializer:
        """Return this type's serializer (a cached instance: this is on the hot path)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.typename!r}>"


def _check_typename(typename: object) -> None:
    """Raise unless ``typename`` is ``"namespace/name"`` (same rules as ``address.parse_typename``)."""
    if not isinstance(typename, str):
        raise TypeError(f"a type name must be a str of the form 'namespace/name', got {type(typename).__name__}")
    if not typename:
        raise TypeNameError("type name can not be missing: expected 'namespace/name', e.g. 'example/user'")
    pos = typename.rfind("/")
    if pos < 0:
        raise TypeNameError(f"malformed type name {typename!r}: expected 'namespace/name', but it has no '/'")
    if pos == 0:
        raise TypeNameError(f"malformed type name {typename!r}: the namespace (before the last '/') is empty")
    if pos == len(typename) - 1:
        raise TypeNameError(f"malformed type name {typename!r}: the name (after the last '/') is empty")
    if "\x00" in typename:
        raise TypeNameError(f"malformed type name {typename!r}: NUL characters are not allowed")


class _SerializerType(Type):
    """A :class:`Type` bound once to one serializer instance."""

    __slots__ = ("_serializer",)

    def __init__(self, typename: str, serializer: TypeSerializer) -> None:
        super().__init__(typename)
        self._serializer = serializer

    def serializer(self) -> TypeSerializer:
        """Return the cached serializer."""
        return self._serializer


# ---------------------------------------------------------------------------------------------
# Protobuf wire format, just enough for StateFun's wrapper messages
# ---------------------------------------------------------------------------------------------
#
# StateFun's primitive types are proto3 messages with a single field ``value = 1``
# (statefun-sdk-protos types/types.proto):
#
#   BooleanWrapper { bool     value = 1; }   tag 0x08, varint
#   IntWrapper     { sfixed32 value = 1; }   tag 0x0D, 4 bytes little-endian
#   FloatWrapper   { float    value = 1; }   tag 0x0D, 4 bytes little-endian IEEE 754
#   LongWrapper    { sfixed64 value = 1; }   tag 0x09, 8 bytes little-endian
#   DoubleWrapper  { double   value = 1; }   tag 0x09, 8 bytes little-endian IEEE 754
#   StringWrapper  { string   value = 1; }   tag 0x0A, varint length + UTF-8
#
# Note int and long are *fixed* width (sfixed32/sfixed64), not varints. Proto3 omits a
# field that holds its default, so 0, False, "" and 0.0 encode as b"". Like StateFun 3.3
# (whose protobuf < 4 compares with ==) we omit -0.0 too and take bools for int and long;
# newer protobuf emits -0.0 and refuses bools. Decoding accepts everything google.protobuf (upb) does:
# fields in any order, the last occurrence wins, unknown fields (and field 1 with another
# wire type, which protobuf treats as unknown) are skipped, groups included.

_WT_VARINT: Final = 0
_WT_FIXED64: Final = 1
_WT_LEN: Final = 2
_WT_START_GROUP: Final = 3
_WT_END_GROUP: Final = 4
_WT_FIXED32: Final = 5

_TAG_BOOL: Final = 0x08  # field 1, varint
_TAG_FIXED64: Final = 0x09  # field 1, fixed64
_TAG_LEN: Final = 0x0A  # field 1, length-delimited
_TAG_FIXED32: Final = 0x0D  # field 1, fixed32

_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_UINT64_MASK: Final = 2**64 - 1

# upb's limits: a varint has at most 10 bytes, a tag or a length at most 5 bytes (and a
# tag must fit in 32 bits), unknown groups nest at most 100 deep.
_MAX_VARINT_BYTES: Final = 10
_MAX_TAG_BYTES: Final = 5
_MAX_GROUP_DEPTH: Final = 100

_pack_tag_i32 = struct.Struct("<Bi").pack
_pack_tag_i64 = struct.Struct("<Bq").pack
_pack_tag_f32 = struct.Struct("<Bf").pack
_pack_tag_f64 = struct.Struct("<Bd").pack
_unpack_i32 = struct.Struct("<i").unpack_from
_unpack_i64 = struct.Struct("<q").unpack_from
_unpack_f32 = struct.Struct("<f").unpack_from
_unpack_f64 = struct.Struct("<d").unpack_from

_EMPTY: Final = b""
_TRUE_BYTES: Final = b"\x08\x01"
_F32_POS_ZERO: Final = _pack_tag_f32(_TAG_FIXED32, 0.0)
_F32_NEG_ZERO: Final = _pack_tag_f32(_TAG_FIXED32, -0.0)
_F32_POS_INF: Final = _pack_tag_f32(_TAG_FIXED32, float("inf"))
_F32_NEG_INF: Final = _pack_tag_f32(_TAG_FIXED32, float("-inf"))

# Encodings of small ints, the most common message values (counters, increments).
_SMALL_INT32: Final[tuple[bytes, ...]] = tuple(_pack_tag_i32(_TAG_FIXED32, i) if i else _EMPTY for i in range(256))
_SMALL_INT64: Final[tuple[bytes, ...]] = tuple(_pack_tag_i64(_TAG_FIXED64, i) if i else _EMPTY for i in range(256))

# Tag and one-byte length of every string shorter than 128 UTF-8 bytes.
_SHORT_STRING_HEADERS: Final[tuple[bytes, ...]] = tuple(bytes((_TAG_LEN, n)) for n in range(0x80))

_WIRE_TYPE_NAMES: Final = ("varint", "fixed64", "length-delimited", "start-group", "end-group", "fixed32")


def _malformed(typename: str, what: str) -> ValueError:
    return ValueError(f"malformed {typename} value: {what}")


def _as_bytes(data: object, typename: str) -> bytes:
    """Return ``data`` as ``bytes`` (copying a ``bytearray``/``memoryview``) or raise ``TypeError``."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"cannot decode a {typename} value from {type(data).__name__}; expected bytes")


def _read_varint(data: bytes, pos: int, max_bytes: int, typename: str, what: str) -> tuple[int, int]:
    """Read a varint at ``pos``; return ``(value, next_pos)``. The value is not truncated."""
    n = len(data)
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= n:
            raise _malformed(typename, f"{what} at byte {start} is truncated")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if pos - start >= max_bytes:
            raise _malformed(typename, f"{what} at byte {start} is longer than {max_bytes} bytes")


def _read_tag(data: bytes, pos: int, typename: str) -> tuple[int, int, int]:
    """Read a field tag at ``pos``; return ``(field_number, wire_type, next_pos)``."""
    tag, nxt = _read_varint(data, pos, _MAX_TAG_BYTES, typename, "field tag")
    if tag > 0xFFFFFFFF:
        raise _malformed(typename, f"field tag at byte {pos} does not fit in 32 bits")
    field, wire_type = tag >> 3, tag & 7
    if field == 0:
        raise _malformed(typename, f"field number 0 at byte {pos}")
    if wire_type > _WT_FIXED32:
        raise _malformed(typename, f"invalid wire type {wire_type} at byte {pos}")
    return field, wire_type, nxt


def _skip_value(data: bytes, pos: int, wire_type: int, typename: str) -> int:
    """Skip one non-group value of ``wire_type`` starting at ``pos``; return the next position."""
    if wire_type == _WT_VARINT:
        return _read_varint(data, pos, _MAX_VARINT_BYTES, typename, "varint")[1]
    if wire_type == _WT_FIXED64:
        end = pos + 8
    elif wire_type == _WT_FIXED32:
        end = pos + 4
    else:  # _WT_LEN
        size, pos = _read_varint(data, pos, _MAX_TAG_BYTES, typename, "length")
        end = pos + size
    if end > len(data):
        raise _malformed(
            typename,
            f"{_WIRE_TYPE_NAMES[wire_type]} value at byte {pos} is truncated: it needs {end - pos} bytes, "
            f"only {len(data) - pos} left",
        )
    return end


def _skip_group(data: bytes, pos: int, field: int, typename: str) -> int:
    """Skip an unknown group (its start tag already read) up to its matching end tag."""
    open_groups = [field]
    n = len(data)
    while open_groups:
        if pos >= n:
            raise _malformed(typename, f"group of field {open_groups[-1]} is not closed")
        inner, wire_type, nxt = _read_tag(data, pos, typename)
        if wire_type == _WT_END_GROUP:
            if inner != open_groups[-1]:
                raise _malformed(
                    typename,
                    f"end-group tag of field {inner} at byte {pos} closes group {open_groups[-1]}",
                )
            open_groups.pop()
            pos = nxt
        elif wire_type == _WT_START_GROUP:
            if len(open_groups) >= _MAX_GROUP_DEPTH:
                raise _malformed(typename, f"groups nested more than {_MAX_GROUP_DEPTH} deep at byte {pos}")
            open_groups.append(inner)
            pos = nxt
        else:
            pos = _skip_value(data, nxt, wire_type, typename)
    return pos


def _find_field1(data: bytes, wire_type: int, typename: str, utf8: bool = False) -> tuple[int, int] | None:
    """Scan a whole wrapper message; return ``(start, end)`` of the last field 1 of ``wire_type``.

    Every other field is checked for well-formedness and skipped, as protobuf does.
    With ``utf8``, every occurrence of field 1 must be valid UTF-8, also one that a
    later occurrence overrides (protobuf rejects those too).
    """
    n = len(data)
    pos = 0
    found: tuple[int, int] | None = None
    while pos < n:
        field, wt, start = _read_tag(data, pos, typename)
        if wt == _WT_START_GROUP:
            pos = _skip_group(data, start, field, typename)
            continue
        if wt == _WT_END_GROUP:
            raise _malformed(typename, f"end-group tag of field {field} at byte {pos} without a start-group tag")
        if wt == _WT_LEN:
            size, start = _read_varint(data, start, _MAX_TAG_BYTES, typename, "length")
            pos = start + size
            if pos > n:
                raise _malformed(
                    typename,
                    f"field {field} at byte {start} is truncated: it needs {size} bytes, only {n - start} left",
                )
        else:
            pos = _skip_value(data, start, wt, typename)
        if field == 1 and wt == wire_type:
            if utf8:
                try:
                    data[start:pos].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _malformed(typename, f"string at byte {start} is not valid UTF-8 ({exc.reason})") from exc
            found = (start, pos)
    return found


def _not_a(typename: str, expected: str, value: object) -> TypeError:
    return TypeError(f"{typename} expects {expected}, got {type(value).__name__}: {value!r:.60}")


def _to_int(value: Any, typename: str) -> int:
    """Convert ``value`` to ``int`` as StateFun's integer types do: anything with ``__index__``.

    ``bool`` is accepted and encodes as 1 or 0: the official SDK 3.3 pins protobuf < 4,
    whose integer fields take bools (newer protobuf refuses them; we follow StateFun).
    """
    try:
        return operator.index(value)
    except TypeError:
        raise _not_a(typename, "an int", value) from None


def _to_float(value: object, typename: str) -> float:
    """Convert ``value`` to ``float`` as protobuf's float fields do (numbers only, never strings)."""
    tp = type(value)
    if isinstance(value, (str, bytes, bytearray, memoryview)) or not (
        hasattr(tp, "__float__") or hasattr(tp, "__index__")
    ):
        raise _not_a(typename, "a float or an int", value)
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError as exc:
        raise ValueError(f"{typename}: {value!r:.60} is too large for a float") from exc


class _BoolSerializer(TypeSerializer):
    """``io.statefun.types/bool``: ``BooleanWrapper { bool value = 1; }``."""

    __slots__ = ()

    def serialize(self, value: Any) -> bytes:
        """Encode a bool (like protobuf, any int is accepted and means ``value != 0``)."""
        if value is True:
            return _TRUE_BYTES
        if value is False:
            return _EMPTY
        try:
            return _TRUE_BYTES if operator.index(value) else _EMPTY
        except TypeError:
            raise _not_a(_BOOL, "a bool", value) from None

    def deserialize(self, data: bytes) -> Any:
        """Decode; any non-zero varint (low 64 bits) is ``True``, as in protobuf."""
        if data == _TRUE_BYTES:
            return True
        if not data:
            return False
        data = _as_bytes(data, _BOOL)
        span = _find_field1(data, _WT_VARINT, _BOOL)
        if span is None:
            return False
        value = _read_varint(data, span[0], _MAX_VARINT_BYTES, _BOOL, "varint")[0]
        return (value & _UINT64_MASK) != 0


class _IntSerializer(TypeSerializer):
    """``io.statefun.types/int``: ``IntWrapper { sfixed32 value = 1; }``."""

    __slots__ = ()

    def serialize(self, value: Any) -> bytes:
        """Encode an int in the int32 range (``True``/``False`` as 1/0, as StateFun 3.3 does)."""
        v: int = value if type(value) is int else _to_int(value, _INT)
        if 0 <= v < 256:
            return _SMALL_INT32[v]
        if _INT32_MIN <= v <= _INT32_MAX:
            return _pack_tag_i32(_TAG_FIXED32, v)
        raise ValueError(f"{_INT} value {v} is out of the int32 range [{_INT32_MIN}, {_INT32_MAX}]; use LongType")

    def deserialize(self, data: bytes) -> Any:
        """Decode to an ``int``."""
        if len(data) == 5 and data[0] == _TAG_FIXED32:
            return _unpack_i32(data, 1)[0]
        if not data:
            return 0
        data = _as_bytes(data, _INT)
        span = _find_field1(data, _WT_FIXED32, _INT)
        return 0 if span is None else _unpack_i32(data, span[0])[0]


class _LongSerializer(TypeSerializer):
    """``io.statefun.types/long``: ``LongWrapper { sfixed64 value = 1; }``."""

    __slots__ = ()

    def serialize(self, value: Any) -> bytes:
        """Encode an int in the int64 range (``True``/``False`` as 1/0, as StateFun 3.3 does)."""
        v: int = value if type(value) is int else _to_int(value, _LONG)
        if 0 <= v < 256:
            return _SMALL_INT64[v]
        if _INT64_MIN <= v <= _INT64_MAX:
            return _pack_tag_i64(_TAG_FIXED64, v)
        raise ValueError(f"{_LONG} value {v} is out of the int64 range [{_INT64_MIN}, {_INT64_MAX}]")

    def deserialize(self, data: bytes) -> Any:
        """Decode to an ``int``."""
        if len(data) == 9 and data[0] == _TAG_FIXED64:
            return _unpack_i64(data, 1)[0]
        if not data:
            return 0
        data = _as_bytes(data, _LONG)
        span = _find_field1(data, _WT_FIXED64, _LONG)
        return 0 if span is None else _unpack_i64(data, span[0])[0]


class _FloatSerializer(TypeSerializer):
    """``io.statefun.types/float``: ``FloatWrapper { float value = 1; }`` (IEEE 754 binary32)."""

    __slots__ = ()

    def serialize(self, value: Any) -> bytes:
        """Encode a float or int, rounded to binary32; out-of-range magnitudes become ±inf as in protobuf."""
        if type(value) is not float:
            value = _to_float(value, _FLOAT)
        try:
            out = _pack_tag_f32(_TAG_FIXED32, value)
        except OverflowError:
            # struct refuses finite values that round to infinity; protobuf (a C cast) stores ±inf.
            out = _F32_POS_INF if value > 0 else _F32_NEG_INF
        # Zero of either sign is omitted, as StateFun 3.3 writes it (its protobuf < 4 drops
        # any value equal to the default; newer protobuf emits -0.0). NaN is emitted.
        return _EMPTY if out in (_F32_POS_ZERO, _F32_NEG_ZERO) else out

    def deserialize(self, data: bytes) -> Any:
        """Decode to a Python ``float`` holding the binary32 value."""
        if len(data) == 5 and data[0] == _TAG_FIXED32:
            return _unpack_f32(data, 1)[0]
        if not data:
            return 0.0
        data = _as_bytes(data, _FLOAT)
        span = _find_field1(data, _WT_FIXED32, _FLOAT)
        return 0.0 if span is None else _unpack_f32(data, span[0])[0]


class _DoubleSerializer(TypeSerializer):
    """``io.statefun.types/double``: ``DoubleWrapper { double value = 1; }`` (IEEE 754 binary64)."""

    __slots__ = ()

    def serialize(self, value: Any) -> bytes:
        """Encode a float or int."""
        if type(value) is not float:
            value = _to_float(value, _DOUBLE)
        if value == 0.0:  # +0.0 and -0.0 are omitted, as StateFun 3.3 writes them (see FloatType)
            return _EMPTY
        return _pack_tag_f64(_TAG_FIXED64, value)

    def deserialize(self, data: bytes) -> Any:
        """Decode to a Python ``float``."""
        if len(data) == 9 and data[0] == _TAG_FIXED64:
            return _unpack_f64(data, 1)[0]
        if not data:
            return 0.0
        data = _as_bytes(data, _DOUBLE)
        span = _find_field1(data, _WT_FIXED64, _DOUBLE)
        return 0.0 if span is None else _unpack_f64(data, span[0])[0]


def _encode_varint(value: int) -> bytes:
    """Encode a non-negative int as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _StringSerializer(TypeSerializer):
    """``io.statefun.types/string``: ``StringWrapper { string value = 1; }`` (UTF-8)."""

    __slots__ = ()

    def serialize(self, value: Any) -> bytes:
        """Encode a ``str`` (or, like protobuf, ``bytes`` that are valid UTF-8)."""
        if isinstance(value, str):
            try:
                utf8 = value.encode()
            except UnicodeEncodeError as exc:
                raise ValueError(f"{_STRING} value is not encodable as UTF-8: {exc.reason} at {exc.start}") from exc
        elif isinstance(value, bytes):
            utf8 = value
            try:
                utf8.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{_STRING} value bytes are not valid UTF-8: {exc.reason} at {exc.start}") from exc
        else:
            raise _not_a(_STRING, "a str", value)
        n = len(utf8)
        if n < 0x80:
            return _SHORT_STRING_HEADERS[n] + utf8 if n else _EMPTY
        return b"\x0a" + _encode_varint(n) + utf8

    def deserialize(self, data: bytes) -> Any:
        """Decode to a ``str``."""
        n = len(data)
        if n >= 2 and data[0] == _TAG_LEN and data[1] == n - 2 and n < 0x82:  # one field, length < 128
            try:
                return str(data[2:], "utf-8")
            except UnicodeDecodeError as exc:
                raise _malformed(_STRING, f"string at byte 2 is not valid UTF-8 ({exc.reason})") from exc
        if not data:
            return ""
        data = _as_bytes(data, _STRING)
        span = _find_field1(data, _WT_LEN, _STRING, utf8=True)
        return "" if span is None else data[span[0] : span[1]].decode("utf-8")


_BOOL: Final = "io.statefun.types/bool"
_INT: Final = "io.statefun.types/int"
_LONG: Final = "io.statefun.types/long"
_FLOAT: Final = "io.statefun.types/float"
_DOUBLE: Final = "io.statefun.types/double"
_STRING: Final = "io.statefun.types/string"

BoolType: Final[Type] = _SerializerType(_BOOL, _BoolSerializer())
IntType: Final[Type] = _SerializerType(_INT, _IntSerializer())
LongType: Final[Type] = _SerializerType(_LONG, _LongSerializer())
FloatType: Final[Type] = _SerializerType(_FLOAT, _FloatSerializer())
DoubleType: Final[Type] = _SerializerType(_DOUBLE, _DoubleSerializer())
StringType: Final[Type] = _SerializerType(_STRING, _StringSerializer())

PY_TYPE_TO_WRAPPER_TYPE: Final[dict[type, Type]] = {
    int: IntType,
    bool: BoolType,
    float: FloatType,
    str: StringType,
}
WRAPPER_TYPE_TO_PY_TYPE: Final[dict[Type, type]] = {
    IntType: int,
    BoolType: bool,
    FloatType: float,
    StringType: str,
}


def type_of_value(value: object) -> Type:
    """Return the wrapper type StateFun would pick for a Python primitive.

    ``bool`` maps to :data:`BoolType`, ``int`` to :data:`IntType` (an int outside the
    int32 range then fails to serialize: pass ``value_type=LongType``), ``float`` to
    :data:`FloatType` and ``str`` to :data:`StringType`, as in StateFun's
    ``PY_TYPE_TO_WRAPPER_TYPE``. Subclasses (``IntEnum``, ...) map like their base.

    Raises:
        TypeError: ``value`` is not one of those primitives.
    """
    found = PY_TYPE_TO_WRAPPER_TYPE.get(type(value))
    if found is not None:
        return found
    for py_type in (bool, int, float, str):  # bool first: it is an int subclass
        if isinstance(value, py_type):
            return PY_TYPE_TO_WRAPPER_TYPE[py_type]
    raise TypeError(f"cannot infer a StateFun type for value of type {type(value).__name__}; pass value_type=")


# ---------------------------------------------------------------------------------------------
# User types: simple_type, JSON, msgpack, protobuf messages
# ---------------------------------------------------------------------------------------------


def _check_bytes_result(out: object, typename: str, producer: str) -> bytes:
    if type(out) is bytes:
        return out
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    if isinstance(out, str):  # StateFun's docs use json.dumps as a serialize_fn: take text as UTF-8
        try:
            return out.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{producer} of type {typename!r} returned text that is not valid Unicode") from exc
    raise TypeError(f"{producer} of type {typename!r} returned {type(out).__name__}, expected bytes (or str)")


class _UserTypeSerializer(TypeSerializer):
    """Serializer of a :func:`simple_type`: the user's two functions."""

    __slots__ = ("_deserialize_fn", "_serialize_fn", "_typename")

    def __init__(
        self, typename: str, serialize_fn: Callable[[Any], bytes], deserialize_fn: Callable[[bytes], Any]
    ) -> None:
        self._typename = typename
        self._serialize_fn = serialize_fn
        self._deserialize_fn = deserialize_fn

    def serialize(self, value: Any) -> bytes:
        """Call ``serialize_fn`` and check that it returned bytes."""
        out = self._serialize_fn(value)
        if type(out) is bytes:
            return out
        return _check_bytes_result(out, self._typename, "serialize_fn")

    def deserialize(self, data: bytes) -> Any:
        """Call ``deserialize_fn``; its exceptions propagate unchanged."""
        return self._deserialize_fn(data)


def simple_type(
    typename: str,
    serialize_fn: Callable[[Any], bytes] | None = None,
    deserialize_fn: Callable[[bytes], Any] | None = None,
) -> Type:
    """Create a type from two functions (StateFun's ``simple_type``).

    Example::

        User = simple_type("com.example/User", serialize_fn=pickle.dumps, deserialize_fn=pickle.loads)

    Args:
        typename: the type's name, ``"namespace/name"``.
        serialize_fn: turns a value into ``bytes`` (a ``str`` it returns is taken as UTF-8,
            so StateFun's ``json.dumps``/``json.loads`` example works).
        deserialize_fn: turns ``bytes`` back into a value.

    Raises:
        TypeNameError: (a ``ValueError``) a malformed type name.
        ValueError: a function is missing.
        TypeError: a function is not callable. Later, ``serialize()`` raises
            ``TypeError`` naming the type when ``serialize_fn`` returns something other
            than bytes or str.
    """
    _check_typename(typename)
    if serialize_fn is None:
        raise ValueError(f"simple_type {typename!r}: serialize_fn is missing")
    if deserialize_fn is None:
        raise ValueError(f"simple_type {typename!r}: deserialize_fn is missing")
    if not callable(serialize_fn):
        raise TypeError(f"simple_type {typename!r}: serialize_fn is not callable: {serialize_fn!r:.60}")
    if not callable(deserialize_fn):
        raise TypeError(f"simple_type {typename!r}: deserialize_fn is not callable: {deserialize_fn!r:.60}")
    return _SerializerType(typename, _UserTypeSerializer(typename, serialize_fn, deserialize_fn))


class _JsonSerializer(TypeSerializer):
    """JSON as StateFun's ``make_json_type`` writes it: ``json.dumps(v, ensure_ascii=False)`` in UTF-8."""

    __slots__ = ("_typename",)

    def __init__(self, typename: str) -> None:
        self._typename = typename

    def serialize(self, value: Any) -> bytes:
        """Encode with :func:`json.dumps` (StateFun's default separators, non-ASCII kept)."""
        try:
            return json.dumps(value, ensure_ascii=False).encode("utf-8")
        except TypeError as exc:
            raise TypeError(f"cannot encode a value of {self._typename} as JSON: {exc}") from exc
        except ValueError as exc:  # circular reference, lone surrogate
            raise ValueError(f"cannot encode a value of {self._typename} as JSON: {exc}") from exc

    def deserialize(self, data: bytes) -> Any:
        """Decode with :func:`json.loads` (UTF-8, or UTF-16/32 detected as json does)."""
        try:
            return json.loads(data)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"malformed {self._typename} value: not valid JSON: {exc}") from exc


def make_json_type(typename: str) -> Type:
    """Create a type whose values are JSON documents (StateFun's ``make_json_type``).

    The bytes are exactly StateFun's: ``json.dumps(value, ensure_ascii=False)`` encoded
    as UTF-8, so both SDKs write identical state and messages.

    Raises:
        TypeNameError: (a ``ValueError``) a malformed type name.
    """
    _check_typename(typename)
    return _SerializerType(typename, _JsonSerializer(typename))


class _MsgPackSerializer(TypeSerializer):
    """msgpack with ``use_bin_type=True`` (``str`` and ``bytes`` stay distinct) and ``raw=False``."""

    __slots__ = ("_packers", "_typename")

    def __init__(self, typename: str) -> None:
        self._typename = typename
        # Reusing a Packer halves the cost of packb(). list.pop()/append() are atomic, so
        # each thread (or re-entrant call) gets a packer of its own.
        self._packers: list[Any] = []

    def serialize(self, value: Any) -> bytes:
        """Encode with msgpack."""
        packers = self._packers
        try:
            packer = packers.pop()
        except IndexError:
            packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        try:
            out: bytes = packer.pack(value)
        except TypeError as exc:
            raise TypeError(f"cannot encode a value of {self._typename} with msgpack: {exc}") from exc
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"cannot encode a value of {self._typename} with msgpack: {exc}") from exc
        packers.append(packer)  # only after success: a failed pack may leave a packer dirty
        return out

    def deserialize(self, data: bytes) -> Any:
        """Decode one msgpack object; trailing bytes are an error."""
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"malformed {self._typename} value: not valid msgpack: {exc}") from exc


def make_msgpack_type(typename: str) -> Type:
    """Create a type whose values are encoded with msgpack (the fast choice for structured values).

    Dicts, lists, str, bytes, int, float, bool and None round-trip; tuples come back as
    lists. Map keys may be any hashable msgpack value (ints included).

    Raises:
        TypeNameError: (a ``ValueError``) a malformed type name.
    """
    _check_typename(typename)
    return _SerializerType(typename, _MsgPackSerializer(typename))


MsgPackType: Final[Type] = make_msgpack_type("statefun-mesh.types/msgpack")


class _ProtobufSerializer(TypeSerializer):
    """A protobuf message class's ``SerializeToString``/``ParseFromString``."""

    __slots__ = ("_cls", "_typename")

    def __init__(self, typename: str, cls: Any) -> None:
        self._typename = typename
        self._cls = cls

    def serialize(self, value: Any) -> bytes:
        """Encode a message of the bound class."""
        if not isinstance(value, self._cls):
            raise _not_a(self._typename, f"a {self._cls.__name__} message", value)
        return _check_bytes_result(value.SerializeToString(), self._typename, "SerializeToString")

    def deserialize(self, data: bytes) -> Any:
        """Parse a message of the bound class."""
        message = self._cls()
        try:
            message.ParseFromString(data)
        except Exception as exc:  # google.protobuf.message.DecodeError is not a ValueError
            raise ValueError(f"malformed {self._typename} value: {exc}") from exc
        return message


def make_protobuf_type(cls: Any, namespace: str | None = None) -> Type:
    """Create a type for a generated protobuf message class (StateFun's ``make_protobuf_type``).

    The type name is ``"<namespace>/<full message name>"`` with the namespace defaulting
    to ``type.googleapis.com``, as in StateFun. statefun_mesh does not depend on
    protobuf: any class with ``DESCRIPTOR.full_name``, ``SerializeToString`` and
    ``ParseFromString`` works.

    Raises:
        ValueError: ``cls`` is missing.
        TypeError: ``cls`` has no message full name.
    """
    if not cls:
        raise ValueError("The Protobuf generated class is missing.")
    name = getattr(getattr(cls, "DESCRIPTOR", None), "full_name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"Unable to deduce the Protobuf Message full name of {cls!r:.60}.")
    typename = f"{namespace or 'type.googleapis.com'}/{name}"
    _check_typename(typename)
    return _SerializerType(typename, _ProtobufSerializer(typename, cls))
