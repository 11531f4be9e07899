"""Tests of statefun_mesh.valuetypes: StateFun wire compatibility, validation, JSON and msgpack types."""

from __future__ import annotations

import enum
import json
import math
import random
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from statefun_mesh import valuetypes as vt
from statefun_mesh.address import parse_typename
from statefun_mesh.errors import TypeNameError

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "data" / "value_vectors.json").read_text())

TYPES: dict[str, vt.Type] = {
    "io.statefun.types/bool": vt.BoolType,
    "io.statefun.types/int": vt.IntType,
    "io.statefun.types/long": vt.LongType,
    "io.statefun.types/float": vt.FloatType,
    "io.statefun.types/double": vt.DoubleType,
    "io.statefun.types/string": vt.StringType,
}


def from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"f64"}:
        return struct.unpack(">d", bytes.fromhex(value["f64"]))[0]
    if isinstance(value, dict) and set(value) == {"bytes"}:
        return bytes.fromhex(value["bytes"])
    return value


def assert_same(actual: Any, expected: Any) -> None:
    """Equal and of the same Python type; floats bit for bit (NaN sign, -0.0)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, float):
        assert struct.pack(">d", actual) == struct.pack(">d", expected), (actual, expected)
    else:
        assert actual == expected


def vector_id(entry: dict[str, Any]) -> str:
    name = entry["typename"].rsplit("/", 1)[1]
    if "hex" in entry and "decoded" not in entry:  # a decode or reject vector
        return f"{name}-{entry['hex'][:40]}"
    return f"{name}-{from_json(entry['value'])!r:.40}"


# ---------------------------------------------------------------------------------------------
# Vectors generated and cross-checked with google.protobuf (tests/data/make_value_vectors.py)
# ---------------------------------------------------------------------------------------------


def test_vectors_cover_every_wrapper_type() -> None:
    for section in ("canonical", "encode_errors", "decode", "reject"):
        assert {entry["typename"] for entry in VECTORS[section]} == set(TYPES), section


@pytest.mark.parametrize("entry", VECTORS["canonical"], ids=vector_id)
def test_canonical_vector_encodes_like_protobuf(entry: dict[str, Any]) -> None:
    serializer = TYPES[entry["typename"]].serializer()
    data = bytes.fromhex(entry["hex"])
    assert serializer.serialize(from_json(entry["value"])) == data
    assert_same(serializer.deserialize(data), from_json(entry["decoded"]))


@pytest.mark.parametrize("entry", VECTORS["encode_errors"], ids=vector_id)
def test_encode_error_vector(entry: dict[str, Any]) -> None:
    serializer = TYPES[entry["typename"]].serializer()
    expected = {"TypeError": TypeError, "ValueError": ValueError}[entry["error"]]
    with pytest.raises(expected) as info:
        serializer.serialize(from_json(entry["value"]))
    assert type(info.value) in (TypeError, ValueError)
    assert entry["typename"] in str(info.value)


@pytest.mark.parametrize("entry", VECTORS["decode"], ids=vector_id)
def test_noncanonical_vector_decodes_like_protobuf(entry: dict[str, Any]) -> None:
    serializer = TYPES[entry["typename"]].serializer()
    assert_same(serializer.deserialize(bytes.fromhex(entry["hex"])), from_json(entry["value"]))


@pytest.mark.parametrize("entry", VECTORS["reject"], ids=vector_id)
def test_malformed_vector_raises_value_error(entry: dict[str, Any]) -> None:
    serializer = TYPES[entry["typename"]].serializer()
    with pytest.raises(ValueError, match=f"malformed {entry['typename']} value: ") as info:
        serializer.deserialize(bytes.fromhex(entry["hex"]))
    assert type(info.value) is ValueError


# ---------------------------------------------------------------------------------------------
# Golden bytes and round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tpe", "value", "hexdata"),
    [
        (vt.BoolType, True, "0801"),
        (vt.BoolType, False, ""),
        (vt.IntType, 0, ""),
        (vt.IntType, 1, "0d01000000"),
        (vt.IntType, -1, "0dffffffff"),
        (vt.IntType, 2**31 - 1, "0dffffff7f"),
        (vt.IntType, -(2**31), "0d00000080"),
        (vt.LongType, 0, ""),
        (vt.LongType, 1, "090100000000000000"),
        (vt.LongType, -(2**63), "090000000000000080"),
        (vt.FloatType, 0.0, ""),
        (vt.FloatType, 1.5, "0d0000c03f"),
        (vt.DoubleType, 0.0, ""),
        (vt.DoubleType, 1.5, "09000000000000f83f"),
        (vt.StringType, "", ""),
        (vt.StringType, "hi", "0a026869"),
        (vt.StringType, "é", "0a02c3a9"),
        (vt.StringType, "a" * 200, "0ac801" + "61" * 200),
    ],
)
def test_golden_bytes(tpe: vt.Type, value: Any, hexdata: str) -> None:
    data = tpe.serializer().serialize(value)
    assert type(data) is bytes
    assert data.hex() == hexdata
    assert_same(tpe.serializer().deserialize(data), value)


@pytest.mark.parametrize(
    ("tpe", "value", "hexdata", "decoded"),
    [
        # StateFun 3.3 (the official SDK pins protobuf < 4) writes nothing for -0.0 ...
        (vt.FloatType, -0.0, "", 0.0),
        (vt.DoubleType, -0.0, "", 0.0),
        (vt.FloatType, -1e-50, "", 0.0),  # rounds to -0.0 in binary32
        # ... and encodes a bool given to IntType or LongType as 1 or 0.
        (vt.IntType, True, "0d01000000", 1),
        (vt.IntType, False, "", 0),
        (vt.LongType, True, "090100000000000000", 1),
        (vt.LongType, False, "", 0),
    ],
)
def test_statefun_edge_cases(tpe: vt.Type, value: Any, hexdata: str, decoded: Any) -> None:
    data = tpe.serializer().serialize(value)
    assert data.hex() == hexdata
    assert_same(tpe.serializer().deserialize(data), decoded)


def test_explicit_negative_zero_still_decodes() -> None:
    # Another writer (Java StateFun, newer protobuf) may emit -0.0: it reads back as -0.0.
    assert_same(vt.FloatType.serializer().deserialize(bytes.fromhex("0d00000080")), -0.0)
    assert_same(vt.DoubleType.serializer().deserialize(bytes.fromhex("090000000000000080")), -0.0)


@pytest.mark.parametrize("value", [0, 1, -1, 127, 128, 255, 256, -256, 2**31 - 1, -(2**31), 2**31 - 256, -(2**31) + 1])
def test_int_round_trip_boundaries(value: int) -> None:
    ser = vt.IntType.serializer()
    assert ser.deserialize(ser.serialize(value)) == value


@pytest.mark.parametrize(
    "value", [0, 1, -1, 255, 256, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, -(2**63), -(2**63) + 1]
)
def test_long_round_trip_boundaries(value: int) -> None:
    ser = vt.LongType.serializer()
    assert ser.deserialize(ser.serialize(value)) == value


def test_random_ints_and_longs_round_trip() -> None:
    rng = random.Random(20240601)
    int_ser, long_ser = vt.IntType.serializer(), vt.LongType.serializer()
    for _ in range(2000):
        i = rng.randint(-(2**31), 2**31 - 1)
        data = int_ser.serialize(i)
        assert len(data) == (5 if i else 0)
        assert int_ser.deserialize(data) == i
        n = rng.randint(-(2**63), 2**63 - 1)
        assert long_ser.deserialize(long_ser.serialize(n)) == n


@pytest.mark.parametrize("value", [0.0, 1.0, -1.0, 0.5, 1e300, -1e-300, 5e-324, math.inf, -math.inf])
def test_double_round_trip_is_exact(value: float) -> None:
    ser = vt.DoubleType.serializer()
    assert_same(ser.deserialize(ser.serialize(value)), value)


def test_double_nan_keeps_its_sign() -> None:
    ser = vt.DoubleType.serializer()
    for nan in (math.nan, -math.nan):
        back = ser.deserialize(ser.serialize(nan))
        assert math.isnan(back)
        assert math.copysign(1.0, back) == math.copysign(1.0, nan)


def test_random_doubles_and_floats_round_trip_bit_exactly() -> None:
    rng = random.Random(7)
    dbl, flt = vt.DoubleType.serializer(), vt.FloatType.serializer()
    for _ in range(2000):
        d = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if not math.isnan(d) and d != 0.0:
            assert_same(dbl.deserialize(dbl.serialize(d)), d)
        # Every binary32 value (NaNs aside) survives float -> bytes -> float unchanged.
        f = struct.unpack("<f", rng.getrandbits(32).to_bytes(4, "little"))[0]
        if not math.isnan(f) and f != 0.0:
            assert_same(flt.deserialize(flt.serialize(f)), f)


def test_float_rounds_to_binary32() -> None:
    ser = vt.FloatType.serializer()
    assert ser.deserialize(ser.serialize(0.1)) == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    assert ser.serialize(1e39) == ser.serialize(math.inf)
    assert ser.serialize(-1e39) == ser.serialize(-math.inf)
    assert ser.serialize(1e-50) == b""  # rounds to +0.0: the proto3 default
    assert ser.serialize(-1e-50) == b""  # rounds to -0.0: omitted too, as StateFun 3.3 does
    for value in (math.inf, -math.inf):
        assert_same(ser.deserialize(ser.serialize(value)), value)
    assert math.isnan(ser.deserialize(ser.serialize(math.nan)))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a",
        "hello world",
        "héllo wörld",
        "日本語テキスト",
        "\U0001f600\U0001f680",
        "\x00\x01",
        "a" * 127,
        "a" * 128,
        "ü" * 10**5,
    ],
)
def test_string_round_trip(value: str) -> None:
    ser = vt.StringType.serializer()
    data = ser.serialize(value)
    assert ser.deserialize(data) == value
    if value:
        assert data[0] == 0x0A and data.endswith(value.encode("utf-8"))


def test_bool_round_trip() -> None:
    ser = vt.BoolType.serializer()
    assert ser.deserialize(ser.serialize(True)) is True
    assert ser.deserialize(ser.serialize(False)) is False


def test_defaults_decode_from_empty_bytes() -> None:
    assert vt.BoolType.serializer().deserialize(b"") is False
    assert vt.IntType.serializer().deserialize(b"") == 0
    assert vt.LongType.serializer().deserialize(b"") == 0
    assert_same(vt.FloatType.serializer().deserialize(b""), 0.0)
    assert_same(vt.DoubleType.serializer().deserialize(b""), 0.0)
    assert vt.StringType.serializer().deserialize(b"") == ""


@pytest.mark.parametrize("tpe", list(TYPES.values()), ids=lambda t: t.typename)
def test_deserialize_accepts_bytes_like_and_rejects_str(tpe: vt.Type) -> None:
    ser = tpe.serializer()
    sample = {
        vt.BoolType: True,
        vt.IntType: -7,
        vt.LongType: 2**40,
        vt.FloatType: 2.5,
        vt.DoubleType: 2.5,
        vt.StringType: "x" * 300,
    }[tpe]
    data = ser.serialize(sample) + b"\x10\x01"  # an unknown field forces the general decoder
    assert ser.deserialize(bytearray(data)) == sample  # type: ignore[arg-type]
    assert ser.deserialize(memoryview(data)) == sample  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=tpe.typename):
        ser.deserialize("not bytes")  # type: ignore[arg-type]


def test_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"malformed io\.statefun\.types/int value: .*truncated"):
        vt.IntType.serializer().deserialize(b"\x0d\x01")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        vt.StringType.serializer().deserialize(b"\x0a\x01\xff")
    with pytest.raises(ValueError, match="nested more than 100 deep"):
        vt.IntType.serializer().deserialize(b"\x13" * 101 + b"\x14" * 101)
    with pytest.raises(ValueError, match="invalid wire type 7"):
        vt.IntType.serializer().deserialize(b"\x0f")
    with pytest.raises(ValueError, match="field number 0"):
        vt.IntType.serializer().deserialize(b"\x00")


# ---------------------------------------------------------------------------------------------
# Serialize-side validation (mirrors google.protobuf's field checks)
# ---------------------------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 3


class Indexable:
    def __index__(self) -> int:
        return 9


def test_int_types_accept_index_and_bool_but_not_float() -> None:
    for tpe in (vt.IntType, vt.LongType):
        ser = tpe.serializer()
        assert ser.deserialize(ser.serialize(Color.RED)) == 3
        assert ser.deserialize(ser.serialize(Indexable())) == 9
        assert ser.deserialize(ser.serialize(True)) == 1  # as StateFun 3.3 (protobuf < 4) encodes it
        assert ser.serialize(False) == b""
        with pytest.raises(TypeError, match="expects an int, got float"):
            ser.serialize(1.0)
        with pytest.raises(TypeError, match="got str"):
            ser.serialize("1")


def test_int_range_errors_name_the_range() -> None:
    with pytest.raises(ValueError, match=r"out of the int32 range \[-2147483648, 2147483647\]; use LongType"):
        vt.IntType.serializer().serialize(2**31)
    with pytest.raises(ValueError, match="int64 range"):
        vt.LongType.serializer().serialize(-(2**63) - 1)


def test_bool_accepts_ints_like_protobuf() -> None:
    ser = vt.BoolType.serializer()
    assert ser.serialize(7) == b"\x08\x01"
    assert ser.serialize(0) == b""
    assert ser.serialize(Color.RED) == b"\x08\x01"
    with pytest.raises(TypeError, match="expects a bool, got float"):
        ser.serialize(1.0)


def test_float_types_accept_numbers_only() -> None:
    for tpe in (vt.FloatType, vt.DoubleType):
        ser = tpe.serializer()
        assert ser.deserialize(ser.serialize(3)) == 3.0
        assert ser.deserialize(ser.serialize(True)) == 1.0
        assert ser.deserialize(ser.serialize(Color.RED)) == 3.0
        for bad in ("1.5", b"1.5", None, [1.0]):
            with pytest.raises(TypeError, match="expects a float or an int"):
                ser.serialize(bad)
        with pytest.raises(ValueError, match="too large for a float"):
            ser.serialize(10**400)


def test_string_accepts_utf8_bytes_like_protobuf() -> None:
    ser = vt.StringType.serializer()
    assert ser.serialize(b"abc") == ser.serialize("abc")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        ser.serialize(b"\xff")
    with pytest.raises(ValueError, match="not encodable as UTF-8"):
        ser.serialize("\ud800")
    with pytest.raises(TypeError, match="expects a str, got int"):
        ser.serialize(5)
    with pytest.raises(TypeError, match="got bytearray"):
        ser.serialize(bytearray(b"abc"))


# ---------------------------------------------------------------------------------------------
# Type, TypeSerializer, type names and the StateFun tables
# ---------------------------------------------------------------------------------------------


def test_builtin_type_names_are_statefuns() -> None:
    assert {name: t.typename for name, t in TYPES.items()} == {name: name for name in TYPES}
    assert vt.MsgPackType.typename == "statefun-mesh.types/msgpack"


def test_serializers_are_cached() -> None:
    for tpe in [*TYPES.values(), vt.MsgPackType, vt.make_json_type("a/b")]:
        assert tpe.serializer() is tpe.serializer()
        assert isinstance(tpe.serializer(), vt.TypeSerializer)


def test_wrapper_tables_match_statefun() -> None:
    assert {
        int: vt.IntType,
        bool: vt.BoolType,
        float: vt.FloatType,
        str: vt.StringType,
    } == vt.PY_TYPE_TO_WRAPPER_TYPE
    assert {
        vt.IntType: int,
        vt.BoolType: bool,
        vt.FloatType: float,
        vt.StringType: str,
    } == vt.WRAPPER_TYPE_TO_PY_TYPE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, vt.BoolType),
        (False, vt.BoolType),
        (0, vt.IntType),
        (2**40, vt.IntType),
        (Color.RED, vt.IntType),
        (1.5, vt.FloatType),
        ("s", vt.StringType),
        ("", vt.StringType),
    ],
)
def test_type_of_value(value: object, expected: vt.Type) -> None:
    assert vt.type_of_value(value) is expected


@pytest.mark.parametrize(("value", "name"), [(None, "NoneType"), (b"x", "bytes"), ([1], "list"), ({}, "dict")])
def test_type_of_value_rejects_other_types(value: object, name: str) -> None:
    with pytest.raises(TypeError) as info:
        vt.type_of_value(value)
    assert str(info.value) == f"cannot infer a StateFun type for value of type {name}; pass value_type="


def test_type_and_serializer_are_abstract() -> None:
    with pytest.raises(TypeError):
        vt.Type("a/b")  # type: ignore[abstract]
    with pytest.raises(TypeError):
        vt.TypeSerializer()  # type: ignore[abstract]


def test_user_subclasses_work_like_statefuns() -> None:
    class UpperSerializer(vt.TypeSerializer):
        def serialize(self, value: Any) -> bytes:
            return str(value).upper().encode()

        def deserialize(self, data: bytes) -> Any:
            return data.decode()

    class UpperType(vt.Type):
        def __init__(self) -> None:
            super().__init__("com.example/Upper")
            self.ser = UpperSerializer()

        def serializer(self) -> vt.TypeSerializer:
            return self.ser

    tpe = UpperType()
    assert tpe.typename == "com.example/Upper"
    assert tpe.serializer().deserialize(tpe.serializer().serialize("abc")) == "ABC"
    assert "com.example/Upper" in repr(tpe)


def test_classes_use_slots_and_docstrings() -> None:
    for obj in [*TYPES.values(), vt.MsgPackType, vt.make_json_type("a/b"), vt.simple_type("a/b", bytes, bytes)]:
        assert not hasattr(obj, "__dict__"), obj
        assert not hasattr(obj.serializer(), "__dict__"), obj
        assert type(obj).__doc__ and type(obj.serializer()).__doc__
    assert vt.Type.__doc__ and vt.TypeSerializer.__doc__


VALID_NAMES = ["a/b", "io.statefun.types/int", "com.example/User", "a/b/c", "ns.with-dash/name_1", "x /y"]
INVALID_NAMES = ["", "noslash", "ns/", "/name", "/", "a/b/", "nul\x00/x"]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_type_names(name: str) -> None:
    tpe = vt.make_json_type(name)
    assert tpe.typename == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "can not be missing"),
        ("noslash", "has no '/'"),
        ("ns/", r"the name \(after the last '/'\) is empty"),
        ("a/b/", r"the name \(after the last '/'\) is empty"),
        ("/name", r"the namespace \(before the last '/'\) is empty"),
        ("/", "is empty"),
        ("nul\x00/x", "NUL"),
    ],
)
def test_invalid_type_names(name: str, message: str) -> None:
    for make in (vt.make_json_type, vt.make_msgpack_type, lambda n: vt.simple_type(n, bytes, bytes)):
        with pytest.raises(TypeNameError, match=message) as info:
            make(name)
        assert isinstance(info.value, ValueError)


def test_type_name_must_be_a_str() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        vt.make_json_type(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        vt.simple_type(b"a/b", bytes, bytes)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", VALID_NAMES + INVALID_NAMES)
def test_type_name_rules_agree_with_address(name: str) -> None:
    try:
        parse_typename(name)
        address_ok = True
    except ValueError:
        address_ok = False
    try:
        vt.make_json_type(name)
        types_ok = True
    except ValueError:
        types_ok = False
    assert types_ok == address_ok


# ---------------------------------------------------------------------------------------------
# simple_type
# ---------------------------------------------------------------------------------------------


def test_simple_type_round_trip() -> None:
    tpe = vt.simple_type("com.example/Csv", lambda v: ",".join(v).encode(), lambda b: b.decode().split(","))
    assert isinstance(tpe, vt.Type)
    data = tpe.serializer().serialize(["a", "b"])
    assert data == b"a,b"
    assert tpe.serializer().deserialize(data) == ["a", "b"]


def test_simple_type_missing_functions() -> None:
    with pytest.raises(ValueError, match="'a/b': serialize_fn is missing"):
        vt.simple_type("a/b", deserialize_fn=bytes)
    with pytest.raises(ValueError, match="'a/b': deserialize_fn is missing"):
        vt.simple_type("a/b", serialize_fn=bytes)
    with pytest.raises(ValueError, match="serialize_fn is missing"):
        vt.simple_type("a/b")


def test_simple_type_functions_must_be_callable() -> None:
    with pytest.raises(TypeError, match="serialize_fn is not callable"):
        vt.simple_type("a/b", b"x", bytes)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="deserialize_fn is not callable"):
        vt.simple_type("a/b", bytes, "x")  # type: ignore[arg-type]


def test_simple_type_serialize_fn_must_return_bytes_or_str() -> None:
    # StateFun's own docs build a type from json.dumps/json.loads: a str is taken as UTF-8.
    tpe = vt.simple_type("com.example/Json", json.dumps, json.loads)  # type: ignore[arg-type]
    assert tpe.serializer().serialize({"a": "é"}) == b'{"a": "\\u00e9"}'
    assert tpe.serializer().deserialize(tpe.serializer().serialize({"a": 1})) == {"a": 1}
    bad = vt.simple_type("com.example/Num", lambda v: 5, bytes)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"serialize_fn of type 'com.example/Num' returned int, expected bytes"):
        bad.serializer().serialize({"a": 1})
    as_bytearray = vt.simple_type("a/b", lambda v: bytearray(v), bytes)  # type: ignore[arg-type,return-value]
    assert as_bytearray.serializer().serialize(b"xy") == b"xy"
    assert type(as_bytearray.serializer().serialize(b"xy")) is bytes


def test_simple_type_user_errors_propagate() -> None:
    def boom(data: bytes) -> Any:
        raise KeyError("mine")

    tpe = vt.simple_type("a/b", bytes, boom)
    with pytest.raises(KeyError, match="mine"):
        tpe.serializer().deserialize(b"x")


# ---------------------------------------------------------------------------------------------
# make_json_type
# ---------------------------------------------------------------------------------------------


def test_json_type_bytes_are_statefuns() -> None:
    tpe = vt.make_json_type("com.example/User")
    value = {"name": "Zoë", "tags": ["日本", 1, 2.5, None, True], "nested": {"k": []}}
    data = tpe.serializer().serialize(value)
    # StateFun: json.dumps(obj, ensure_ascii=False).encode('utf-8')
    assert data == json.dumps(value, ensure_ascii=False).encode("utf-8")
    assert "Zoë".encode() in data
    assert tpe.serializer().deserialize(data) == value


def test_json_type_reads_compact_and_pretty_json() -> None:
    ser = vt.make_json_type("a/b").serializer()
    assert ser.deserialize(b'{"a":[1,2]}') == {"a": [1, 2]}
    assert ser.deserialize(b'{\n  "a": [1, 2]\n}') == {"a": [1, 2]}
    assert ser.deserialize(bytearray(b"[1]")) == [1]  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"{", b'{"a": 1}x', b"\xff\xfe\xfd", b"nope", b'"\xff"'])
def test_json_type_malformed_input(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"malformed com\.example/User value: not valid JSON") as info:
        vt.make_json_type("com.example/User").serializer().deserialize(data)
    assert type(info.value) is ValueError


def test_json_type_unencodable_values() -> None:
    ser = vt.make_json_type("com.example/User").serializer()
    with pytest.raises(TypeError, match=r"com\.example/User as JSON.*set"):
        ser.serialize({1, 2})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match=r"com\.example/User as JSON"):
        ser.serialize(loop)


# ---------------------------------------------------------------------------------------------
# msgpack
# ---------------------------------------------------------------------------------------------

MSGPACK_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    "",
    "héllo",
    b"\x00\xff",
    [],
    {},
    [1, "a", b"b", None, [2.5, {"k": "v"}]],
    {"user": "abc", "n": 12, "xs": [1, 2, 3]},
    {1: "int key", "s": {b"bin": [True, False]}},
]


@pytest.mark.parametrize("value", MSGPACK_VALUES, ids=repr)
def test_msgpack_round_trip(value: Any) -> None:
    ser = vt.MsgPackType.serializer()
    data = ser.serialize(value)
    assert data == msgpack.packb(value, use_bin_type=True)
    back = ser.deserialize(data)
    assert back == value
    assert type(back) is type(value)


def test_msgpack_keeps_str_and_bytes_apart_and_turns_tuples_into_lists() -> None:
    ser = vt.make_msgpack_type("com.example/Pack").serializer()
    assert ser.deserialize(ser.serialize(["a", b"a"])) == ["a", b"a"]
    assert ser.deserialize(ser.serialize((1, (2, 3)))) == [1, [2, 3]]


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xa1\xff", b"\xd9", b"\x81\x91\x01\x02"],
    ids=["empty", "never-used", "truncated-array", "extra-data", "bad-utf8", "truncated-str", "list-key"],
)
def test_msgpack_malformed_input(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"malformed com\.example/Pack value: not valid msgpack") as info:
        vt.make_msgpack_type("com.example/Pack").serializer().deserialize(data)
    assert type(info.value) is ValueError


def test_msgpack_unencodable_values_and_recovery() -> None:
    ser = vt.make_msgpack_type("com.example/Pack").serializer()
    with pytest.raises(TypeError, match=r"com\.example/Pack with msgpack"):
        ser.serialize({"a": [1, {2, 3}]})
    with pytest.raises(TypeError, match=r"com\.example/Pack with msgpack"):
        ser.serialize(object())
    with pytest.raises(ValueError, match=r"com\.example/Pack with msgpack"):
        ser.serialize([1, 2**64])
    # A failed pack leaves nothing behind in the next value's bytes.
    assert ser.serialize([1, 2]) == msgpack.packb([1, 2])


def test_msgpack_serializer_is_thread_safe() -> None:
    ser = vt.MsgPackType.serializer()
    failures: list[str] = []

    def work(n: int) -> None:
        for i in range(2000):
            value = {"thread": n, "i": i, "payload": [n] * (i % 17)}
            if ser.deserialize(ser.serialize(value)) != value:
                failures.append(f"{n}/{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# ---------------------------------------------------------------------------------------------
# make_protobuf_type (duck-typed: protobuf is not a dependency)
# ---------------------------------------------------------------------------------------------


class _Descriptor:
    full_name = "com.example.Greeting"


class FakeGreeting:
    """Quacks like a generated protobuf message."""

    DESCRIPTOR = _Descriptor()

    def __init__(self, text: str = "") -> None:
        self.text = text

    def SerializeToString(self) -> bytes:
        return self.text.encode()

    def ParseFromString(self, data: bytes) -> None:
        if data.startswith(b"!"):
            raise RuntimeError("DecodeError: bad wire data")
        self.text = data.decode()


def test_make_protobuf_type() -> None:
    tpe = vt.make_protobuf_type(FakeGreeting)
    assert tpe.typename == "type.googleapis.com/com.example.Greeting"
    assert vt.make_protobuf_type(FakeGreeting, namespace="example").typename == "example/com.example.Greeting"
    ser = tpe.serializer()
    assert ser.deserialize(ser.serialize(FakeGreeting("hi"))).text == "hi"
    with pytest.raises(ValueError, match=r"malformed type.googleapis.com/com.example.Greeting value"):
        ser.deserialize(b"!x")
    with pytest.raises(TypeError, match="a FakeGreeting message"):
        ser.serialize("hi")
    with pytest.raises(ValueError, match="missing"):
        vt.make_protobuf_type(None)
    with pytest.raises(TypeError, match="full name"):
        vt.make_protobuf_type(int)


def test_public_names() -> None:
    for name in vt.__all__:
        assert hasattr(vt, name), name
    assert {"Type", "TypeSerializer", "simple_type", "make_json_type", "IntType", "MsgPackType"} <= set(vt.__all__)
