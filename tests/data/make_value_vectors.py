"""Write tests/data/value_vectors.json: StateFun wrapper-type vectors checked against google.protobuf.

Run from the repository root with protobuf installed (``pip install protobuf``):

    python tests/data/make_value_vectors.py

The script builds StateFun's ``types.proto`` messages (``io.statefun.sdk.types``:
``BooleanWrapper { bool }``, ``IntWrapper { sfixed32 }``, ``FloatWrapper { float }``,
``LongWrapper { sfixed64 }``, ``DoubleWrapper { double }``, ``StringWrapper { string }``,
all ``value = 1``, proto3) at run time, so no protoc is needed. For every vector it
asserts that ``statefun_mesh.valuetypes`` agrees with protobuf: the same bytes for an
encoding, the same value for a decoding, an error where protobuf raises one. The unit
tests read the JSON and never import protobuf.

JSON value forms: ints, bools and strings are plain JSON; a float is
``{"f64": "<16 hex digits>"}`` (the big-endian IEEE 754 binary64 bits, so that NaN
signs, -0.0 and infinities survive); bytes are ``{"bytes": "<hex>"}``.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

from google.protobuf import __version__ as protobuf_version
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation
from google.protobuf.message import DecodeError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from statefun_mesh import valuetypes as vt  # noqa: E402

OUT = Path(__file__).resolve().with_name("value_vectors.json")

_F = descriptor_pb2.FieldDescriptorProto
WRAPPERS = {
    "io.statefun.types/bool": ("BooleanWrapper", _F.TYPE_BOOL),
    "io.statefun.types/int": ("IntWrapper", _F.TYPE_SFIXED32),
    "io.statefun.types/float": ("FloatWrapper", _F.TYPE_FLOAT),
    "io.statefun.types/long": ("LongWrapper", _F.TYPE_SFIXED64),
    "io.statefun.types/double": ("DoubleWrapper", _F.TYPE_DOUBLE),
    "io.statefun.types/string": ("StringWrapper", _F.TYPE_STRING),
}
TYPES = {
    "io.statefun.types/bool": vt.BoolType,
    "io.statefun.types/int": vt.IntType,
    "io.statefun.types/float": vt.FloatType,
    "io.statefun.types/long": vt.LongType,
    "io.statefun.types/double": vt.DoubleType,
    "io.statefun.types/string": vt.StringType,
}


def _message_classes() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="statefun_types_vectors.proto", package="io.statefun.sdk.types", syntax="proto3"
    )
    for message_name, field_type in WRAPPERS.values():
        message = fdp.message_type.add(name=message_name)
        message.field.add(name="value", number=1, type=field_type, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        typename: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"io.statefun.sdk.types.{name}"))
        for typename, (name, _) in WRAPPERS.items()
    }


CLASSES = _message_classes()


def pb_serialize(typename: str, value: Any) -> bytes:
    message = CLASSES[typename]()
    message.value = value
    return bytes(message.SerializeToString())


def statefun_serialize(typename: str, value: Any) -> bytes:
    """The bytes the official StateFun SDK 3.3 writes, which statefun_mesh matches.

    The SDK pins protobuf < 4, whose Python fields drop any value equal to the default
    (so -0.0 is omitted, as +0.0 is) and whose integer fields take bools as 1 and 0.
    Newer protobuf emits -0.0 and refuses bools; everywhere else the two agree.
    """
    if typename in (INT, LONG) and isinstance(value, bool):
        return pb_serialize(typename, int(value))
    if typename in (FLOAT, DOUBLE) and isinstance(value, float) and value == 0.0:
        pb_serialize(typename, value)  # still checked: protobuf must accept it
        return b""
    data = pb_serialize(typename, value)
    if typename == FLOAT and pb_deserialize(typename, data) == 0.0:  # rounds to -0.0 in binary32
        return b""
    return data


def pb_deserialize(typename: str, data: bytes) -> Any:
    message = CLASSES[typename]()
    message.ParseFromString(data)
    return message.value


def to_json(value: Any) -> Any:
    if isinstance(value, float):
        return {"f64": struct.pack(">d", value).hex()}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return value


def same(a: Any, b: Any) -> bool:
    """Equal values of equal Python types; floats compared bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return bool(a == b)


def f32(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


def f64(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


BOOL, INT, LONG = "io.statefun.types/bool", "io.statefun.types/int", "io.statefun.types/long"
FLOAT, DOUBLE, STRING = "io.statefun.types/float", "io.statefun.types/double", "io.statefun.types/string"

FLT_MAX = f32(0x7F7FFFFF)
NEG_NAN = -math.nan

ENCODE: list[tuple[str, Any]] = [
    *((BOOL, v) for v in (True, False, 0, 1, 5, -1, 2**40)),
    *((INT, v) for v in (0, 1, -1, 7, 127, 128, 255, 256, 65535, 123456789, -123456789, 2**31 - 1, -(2**31))),
    *((INT, v) for v in (True, False)),  # StateFun 3.3 (protobuf < 4) encodes bools as ints
    *((LONG, v) for v in (True, False)),
    *((LONG, v) for v in (0, 1, -1, 255, 256, 2**31, -(2**31) - 1, 2**40 + 5, 2**53 + 1, 2**63 - 1, -(2**63))),
    *(
        (FLOAT, v)
        for v in (
            0.0,
            -0.0,
            1.0,
            -2.5,
            0.1,
            math.pi,
            FLT_MAX,
            -FLT_MAX,
            3.4028235677973362e38,  # rounds down to FLT_MAX
            3.4028235677973366e38,  # rounds up to +inf (struct refuses it; protobuf stores inf)
            -3.4028235677973366e38,
            1e39,
            -1e300,
            1.401298464324817e-45,  # smallest subnormal
            7e-46,  # rounds to +0.0: omitted
            7.1e-46,
            -1e-50,  # rounds to -0.0: emitted
            1e-50,
            math.inf,
            -math.inf,
            math.nan,
            NEG_NAN,
            1,
            16777217,  # 2**24 + 1 is not a binary32 value
            -3,
            True,
        )
    ),
    *(
        (DOUBLE, v)
        for v in (
            0.0,
            -0.0,
            1.0,
            0.1,
            -math.e,
            5e-324,
            1.7976931348623157e308,
            math.inf,
            -math.inf,
            math.nan,
            NEG_NAN,
            1,
            2**53 + 1,
            -(2**63),
            True,
        )
    ),
    *(
        (STRING, v)
        for v in (
            "",
            "a",
            "hello world",
            "héllo wörld",
            "日本語",
            "\U0001f600",
            "\x00",
            "\uffff",
            "a" * 127,
            "a" * 128,
            "é" * 64,
            "a" * 300,
            "x" * 16384,
            b"abc",
            "é".encode(),
        )
    ),
]

ENCODE_ERRORS: list[tuple[str, Any]] = [
    *((t, None) for t in TYPES),
    (BOOL, 1.0),
    (BOOL, "true"),
    (BOOL, [1]),
    (INT, 1.0),
    (INT, "1"),
    (INT, [1]),
    (INT, 2**31),
    (INT, -(2**31) - 1),
    (LONG, 1.5),
    (LONG, 2**63),
    (LONG, -(2**63) - 1),
    (FLOAT, "1.0"),
    (FLOAT, [1.0]),
    (FLOAT, 2**2000),
    (DOUBLE, "1.0"),
    (DOUBLE, {"x": 1.0}),
    (DOUBLE, 2**2000),
    (STRING, 1),
    (STRING, ["a"]),
    (STRING, b"\xff"),
    (STRING, b"\xc3"),
    (STRING, "\ud800"),
]
# Where statefun_mesh raises another class than protobuf, deliberately.
ERROR_DIFFERENCES = {
    # float(2**2000) overflows: protobuf lets OverflowError escape; a ValueError is what callers catch.
    (FLOAT, "OverflowError"): "ValueError",
    (DOUBLE, "OverflowError"): "ValueError",
}


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def group(depth: int, field: int = 2) -> bytes:
    return bytes([field << 3 | 3]) * depth + bytes([field << 3 | 4]) * depth


I32_7 = "0d 07000000"
I64_7 = "09 0700000000000000"

# Valid but non-canonical encodings: protobuf accepts them.
DECODE: list[tuple[str, bytes]] = [
    (INT, h("0d 01000000 0d 02000000")),  # repeated: the last wins
    (INT, h("10 05" + I32_7)),  # unknown varint field first
    (INT, h(I32_7 + "10 05")),  # ... and last
    (INT, h(I32_7 + "08 05")),  # field 1 as a varint: unknown to an sfixed32 field
    (INT, h("08 05")),
    (INT, h(I32_7 + "0a 04 09000000")),  # field 1 length-delimited ("packed"): unknown too
    (INT, h(I32_7 + "09 0102030405060708")),  # field 1 as fixed64: unknown
    (INT, h("11 0102030405060708" + I32_7 + "15 01020304")),  # unknown fixed64 / fixed32
    (INT, h("1a 03 616263" + I32_7 + "22 00")),  # unknown length-delimited
    (INT, h("8d 00 07000000")),  # non-minimal 2-byte tag
    (INT, h("8d 80 80 80 00 07000000")),  # 5-byte tag
    (INT, h("f8 ff ff ff 0f 01" + I32_7)),  # field 2**29 - 1
    (INT, h("10 ff ff ff ff ff ff ff ff ff 01" + I32_7)),  # 10-byte varint
    (INT, h("10 ff ff ff ff ff ff ff ff ff 7f" + I32_7)),  # 10th byte beyond 64 bits
    (INT, h("12 81 80 80 80 00 61" + I32_7)),  # 5-byte length
    (INT, h("0b 0c")),  # empty group with field number 1
    (INT, h("13 14" + I32_7)),  # empty unknown group
    (INT, h("13 0d 03000000 14")),  # field 1 inside a group is not field 1
    (INT, h(I32_7 + "13 1b 08 01 1c 0a 01 ff 14")),  # nested groups; bad UTF-8 in a group is fine
    (INT, group(100) + h(I32_7)),  # groups nested 100 deep
    (INT, h("13 8b 80 80 80 00 8c 80 80 80 00 14")),  # long tags inside groups
    (INT, h("0d ffffffff")),
    (INT, h("0d 00000080")),
    (LONG, h(I64_7 + "09 0100000000000000")),
    (LONG, h("08 01")),  # field 1 as varint: unknown
    (LONG, h("0d 01000000" + I64_7)),
    (LONG, h("1a 00" + I64_7 + "13 14")),
    (BOOL, h("08 02")),
    (BOOL, h("08 80 01")),
    (BOOL, h("08 80 00")),  # non-minimal zero
    (BOOL, h("08 01 08 00")),  # the last wins
    (BOOL, h("08 00 08 01")),
    (BOOL, h("08 80 80 80 80 10")),  # 2**32
    (BOOL, h("08 80 80 80 80 80 80 80 80 80 01")),  # 2**63
    (BOOL, h("08 80 80 80 80 80 80 80 80 80 02")),  # 2**64: truncated to 0
    (BOOL, h("08 80 80 80 80 80 80 80 80 80 7f")),
    (BOOL, h("08 ff ff ff ff ff ff ff ff ff 01")),  # -1 as a varint
    (BOOL, h("0a 01 01")),  # length-delimited field 1: unknown
    (BOOL, h("0d 01000000")),
    (BOOL, h("10 01 08 01 18 00")),
    (FLOAT, h("0d 0000803f 0d 00000040")),
    (FLOAT, h("09 000000000000f03f")),  # a double in field 1: unknown
    (FLOAT, h("0d 0100c07f")),  # NaN with a payload
    (FLOAT, h("0d 0100807f")),  # signalling NaN
    (FLOAT, h("0d 010080ff")),
    (FLOAT, h("0d 00000000")),  # explicit +0.0
    (FLOAT, h("0d 01000000")),
    (FLOAT, h("10 01 0d 0000c0ff 13 14")),
    (DOUBLE, h("09 000000000000f03f 09 0000000000000040")),
    (DOUBLE, h("0d 0000803f")),  # a float in field 1: unknown
    (DOUBLE, h("09 010000000000f87f")),
    (DOUBLE, h("09 010000000000f07f")),  # signalling NaN
    (DOUBLE, h("09 0000000000000000")),
    (DOUBLE, h("09 0000000000000080")),
    (STRING, h("0a 01 61 0a 01 62")),
    (STRING, h("0a 02 c3a9 0a 00")),  # the last wins, also when empty
    (STRING, h("0a 00")),
    (STRING, h("0a 01 00")),
    (STRING, h("0a 81 00 61")),  # non-minimal length
    (STRING, h("0a 81 80 80 80 00 61")),  # 5-byte length
    (STRING, h("08 01")),  # field 1 as a varint: unknown
    (STRING, h("12 01 ff 0a 01 61")),  # bad UTF-8 in an unknown field is fine
    (STRING, h("0d 01020304 0a 03 e697a5")),
    (STRING, h("0a 03 efbfbf")),  # U+FFFF
    (STRING, h("0a 04 f48fbfbf")),  # U+10FFFF
    (STRING, h("13 0a 01 ff 14 0a 01 61")),
    (STRING, b"\x0a\x80\x01" + b"a" * 128),
    (STRING, b"\x0a\x81\x01" + b"b" * 129 + b"\x10\x00"),
]

# Malformed: protobuf raises DecodeError; statefun_mesh must raise ValueError.
REJECT: list[tuple[str, bytes]] = [
    (INT, h("0d 010000")),  # truncated fixed32
    (INT, h("0d")),
    (INT, h("00")),  # field number 0
    (INT, h("00 00")),
    (INT, h("08")),  # truncated varint
    (INT, h("08 80")),
    (INT, h("80")),  # truncated tag
    (INT, h("0e")),  # wire type 6
    (INT, h("0f")),  # wire type 7
    (INT, h("01 0000000000000000")),  # field 0 fixed64
    (INT, h("04")),  # end group of field 0
    (INT, h("14")),  # end group without a start
    (INT, h(I32_7 + "14")),
    (INT, h("13")),  # group not closed
    (INT, h("13 0d 03000000")),
    (INT, h("13 1c")),  # closed by another field's end tag
    (INT, h("13 1b 14 1c")),  # crossed groups
    (INT, h("13 00 14")),  # field 0 inside a group
    (INT, h("13 0e 14")),  # wire type 6 inside a group
    (INT, h("13 0d 010000 14")),  # truncated value inside a group
    (INT, h("13 8b 80 80 80 80 00 14")),  # 6-byte tag inside a group
    (INT, group(101) + h(I32_7)),  # groups nested 101 deep
    (INT, h("10 ff ff ff ff ff ff ff ff ff ff 01")),  # 11-byte varint
    (INT, h("8d 80 80 80 80 00 07000000")),  # 6-byte tag
    (INT, h("f8 ff ff ff 1f 01")),  # tag beyond 32 bits
    (INT, h("12 05 616263")),  # length beyond the end
    (INT, h("12 ff ff ff ff 07")),
    (INT, h("12 81 80 80 80 80 00 61")),  # 6-byte length
    (INT, h("09 01020304")),  # truncated unknown fixed64
    (INT, h("15 010203")),  # truncated unknown fixed32
    (LONG, h("09 01000000000000")),  # truncated fixed64
    (LONG, h("09")),
    (LONG, h(I64_7 + "0d 0102")),
    (BOOL, h("08 80 80")),
    (BOOL, h("08 ff ff ff ff ff ff ff ff ff ff 01")),
    (BOOL, h("08 01 0a")),
    (FLOAT, h("0d 0000c0")),
    (FLOAT, h("0d 0000803f 0c")),  # end group at the top level
    (DOUBLE, h("09 000000000000f0")),
    (DOUBLE, h("09 000000000000f03f 0b")),
    (STRING, h("0a 01 ff")),  # invalid UTF-8
    (STRING, h("0a 01 80")),  # lone continuation byte
    (STRING, h("0a 02 c080")),  # overlong encoding
    (STRING, h("0a 03 eda080")),  # UTF-16 surrogate
    (STRING, h("0a 04 f4908080")),  # beyond U+10FFFF
    (STRING, h("0a 02 c3")),  # length beyond the end
    (STRING, h("0a 01 c3")),  # truncated sequence
    (STRING, h("0a 01 ff 0a 01 61")),  # bad UTF-8, even though a later value wins
    (STRING, h("0a")),
    (STRING, b"\x0a\x80\x01" + b"a" * 127),
    (STRING, b"\x0a\x80" + b"a" * 128),  # 0x80 is not a length of 128 (it continues)
]


def main() -> None:
    print(f"protobuf {protobuf_version} ({api_implementation.Type()})")
    canonical = []
    for typename, value in ENCODE:
        expected = statefun_serialize(typename, value)
        ours = TYPES[typename].serializer().serialize(value)
        assert ours == expected, (typename, value, ours.hex(), expected.hex())
        decoded = pb_deserialize(typename, expected)
        ours_decoded = TYPES[typename].serializer().deserialize(expected)
        assert same(ours_decoded, decoded), (typename, value, ours_decoded, decoded)
        entry = {"typename": typename, "value": to_json(value), "hex": expected.hex(), "decoded": to_json(decoded)}
        if not isinstance(value, bool) or typename == BOOL:
            pb_bytes = pb_serialize(typename, value)
            if pb_bytes != expected:
                entry["protobuf_hex"] = pb_bytes.hex()  # where StateFun 3.3 differs from this protobuf
        canonical.append(entry)

    errors = []
    for typename, value in ENCODE_ERRORS:
        try:
            pb_serialize(typename, value)
        except (TypeError, ValueError, OverflowError) as exc:
            pb_error = type(exc).__name__
            if isinstance(exc, UnicodeError):
                pb_error = "ValueError"
        else:
            raise AssertionError(f"protobuf accepted {typename} {value!r}")
        expected_error = ERROR_DIFFERENCES.get((typename, pb_error), pb_error)
        try:
            TYPES[typename].serializer().serialize(value)
        except (TypeError, ValueError) as exc:
            ours = "ValueError" if isinstance(exc, ValueError) else "TypeError"
            assert type(exc) in (TypeError, ValueError), (typename, value, exc)
        else:
            raise AssertionError(f"statefun_mesh accepted {typename} {value!r}")
        assert ours == expected_error, (typename, value, ours, pb_error)
        entry = {"typename": typename, "value": to_json(value), "error": ours}
        if ours != pb_error:
            entry["protobuf_error"] = pb_error
        errors.append(entry)

    decode = []
    for typename, data in DECODE:
        expected = pb_deserialize(typename, data)
        ours = TYPES[typename].serializer().deserialize(data)
        assert same(ours, expected), (typename, data.hex(), ours, expected)
        decode.append({"typename": typename, "hex": data.hex(), "value": to_json(expected)})

    reject = []
    for typename, data in REJECT:
        try:
            pb_deserialize(typename, data)
        except DecodeError:
            pass
        else:
            raise AssertionError(f"protobuf accepted {typename} {data.hex()}")
        try:
            value = TYPES[typename].serializer().deserialize(data)
        except ValueError as exc:
            assert type(exc) is ValueError and typename in str(exc), exc
        else:
            raise AssertionError(f"statefun_mesh accepted {typename} {data.hex()} as {value!r}")
        reject.append({"typename": typename, "hex": data.hex()})

    document = {
        "about": (
            "StateFun wrapper-type vectors (io.statefun.sdk.types, proto3), checked against "
            f"google.protobuf {protobuf_version} ({api_implementation.Type()}) by tests/data/make_value_vectors.py, "
            "with StateFun 3.3's own choices where they differ (protobuf_hex: -0.0 omitted, bools as ints). "
            "Floats are {'f64': big-endian binary64 bits}, bytes are {'bytes': hex}."
        ),
        "canonical": canonical,
        "encode_errors": errors,
        "decode": decode,
        "reject": reject,
    }
    OUT.write_text(json.dumps(document, indent=1, ensure_ascii=True) + "\n")
    print(
        f"wrote {OUT.relative_to(ROOT)}: {len(canonical)} canonical, {len(errors)} encode errors, "
        f"{len(decode)} decode, {len(reject)} reject"
    )


if __name__ == "__main__":
    main()
