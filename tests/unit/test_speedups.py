"""The hot path: golden vectors for both implementations, and C/Python parity.

``speedups`` (tests/conftest.py) runs a test once with the pure-Python twin and once
with the Cython core. Tests that compare the two take ``both`` instead. The vectors
come from tests/data/make_vectors.py.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import importlib
import inspect
import json
import os
import random
import subprocess
import sys
import tracemalloc
from collections import namedtuple
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

from statefun_mesh import _speedups_py
from statefun_mesh.errors import FrameDecodeError
from tests.cores import c_module

DATA = Path(__file__).resolve().parents[1] / "data"
HASH_VECTORS = json.loads((DATA / "hash_vectors.json").read_text("utf-8"))
FRAME_VECTORS = json.loads((DATA / "frame_vectors.json").read_text("utf-8"))
U64 = 2**64 - 1


@pytest.fixture
def both() -> tuple[ModuleType, ModuleType]:
    """(twin, Cython core), for tests that compare the two."""
    return _speedups_py, c_module()


# ---------------------------------------------------------------- vector helpers


def _field(v: Any, *, hexed: bool) -> Any:
    if isinstance(v, dict):
        unit = bytes.fromhex(v["repeat"]) if hexed else v["repeat"]
        return unit * v["count"]
    return bytes.fromhex(v) if hexed else v


def _record(rec: list[Any]) -> tuple[Any, ...]:
    return (*(_field(rec[i], hexed=False) for i in range(5)), _field(rec[5], hexed=True), rec[6], rec[7])


def _records(vector: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [_record(r) for r in vector["records"]]


def _check_frame(frame: bytes, vector: dict[str, Any]) -> None:
    assert len(frame) == vector["size"]
    assert hashlib.sha256(frame).hexdigest() == vector["sha256"]
    if "hex" in vector:
        assert frame.hex() == vector["hex"]


def _types(records: list[Any]) -> list[tuple[type, ...]]:
    return [tuple(type(f) for f in r) for r in records]


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


# ---------------------------------------------------------------- vectors: hashing


def test_hash_vectors_cover_the_brief() -> None:
    sizes = {v["size"] for v in HASH_VECTORS["vectors"]}
    assert set(range(41)) | {64, 100, 1000} <= sizes
    assert any(v["id"] == "ünïcødé" for v in HASH_VECTORS["vectors"])


@pytest.mark.parametrize("vector", HASH_VECTORS["vectors"], ids=_ids(HASH_VECTORS["vectors"]))
def test_hash_vector(speedups: ModuleType, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    assert f"{vector['hash']:016x}" == vector["hash_hex"]
    assert speedups.stable_hash(data) == vector["hash"]
    assert speedups.stable_hash(bytearray(data)) == vector["hash"]
    assert speedups.stable_hash(memoryview(data)) == vector["hash"]
    if vector["id"] is not None:
        assert vector["id"].encode("utf-8") == data
        for mp, kg in vector["key_group"].items():
            assert speedups.key_group(vector["id"], int(mp)) == kg
            assert speedups.key_groups([vector["id"]] * 2, int(mp)) == [kg, kg]


@pytest.mark.parametrize("max_parallelism", HASH_VECTORS["max_parallelism"])
def test_key_groups_of_all_vectors(speedups: ModuleType, max_parallelism: int) -> None:
    vectors = [v for v in HASH_VECTORS["vectors"] if v["id"] is not None]
    ids = (v["id"] for v in vectors)  # any iterable, consumed once
    assert speedups.key_groups(ids, max_parallelism) == [v["key_group"][str(max_parallelism)] for v in vectors]


def test_hash_matches_reference_xxhash(speedups: ModuleType) -> None:
    xxhash = pytest.importorskip("xxhash")
    rng = random.Random(0x5EED)
    for vector in HASH_VECTORS["vectors"]:
        assert xxhash.xxh64_intdigest(bytes.fromhex(vector["hex"]), 0) == vector["hash"]
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 300))
        assert speedups.stable_hash(data) == xxhash.xxh64_intdigest(data, 0)
    text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)])) for _ in range(200))
    for n in range(0, 200, 7):
        assert speedups.key_group(text[:n], 32768) == xxhash.xxh64_intdigest(text[:n].encode(), 0) % 32768


def test_hash_of_strided_and_typed_buffers(speedups: ModuleType) -> None:
    data = bytes(range(256)) * 2
    strided = memoryview(data)[::3]
    assert not strided.c_contiguous
    assert speedups.stable_hash(strided) == speedups.stable_hash(bytes(strided))
    assert speedups.stable_hash(memoryview(data)[5:77]) == speedups.stable_hash(data[5:77])


@pytest.mark.parametrize("bad", ["text", 5, None, [1, 2]])
def test_stable_hash_rejects_non_bytes(speedups: ModuleType, bad: object) -> None:
    with pytest.raises(TypeError):
        speedups.stable_hash(bad)


# ---------------------------------------------------------------- vectors: frames


def test_frame_vectors_cover_the_brief() -> None:
    records = [r for v in FRAME_VECTORS["frames"] for r in _records(v)]
    counts = {len(v["records"]) for v in FRAME_VECTORS["frames"]}
    assert {0, 1, 15, 16, 17} <= counts
    str_lens = {len(f.encode()) for r in records for f in r[:5]}
    assert {31, 32, 255, 256, 65535, 65536} <= str_lens
    assert {0, 255, 256, 65536} <= {len(r[5]) for r in records}
    ints = {r[i] for r in records for i in (6, 7)}
    assert {0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, U64} <= ints


@pytest.mark.parametrize("vector", FRAME_VECTORS["frames"], ids=_ids(FRAME_VECTORS["frames"]))
def test_frame_vector_encode(speedups: ModuleType, vector: dict[str, Any]) -> None:
    records = _records(vector)
    _check_frame(speedups.encode_batch(records), vector)
    _check_frame(speedups.encode_batch(iter(records)), vector)
    enc = speedups.BatchEncoder()
    for rec in records:
        enc.append(rec)
    assert len(enc) == len(records)
    header = 3 if len(records) < 16 else 5
    assert enc.nbytes == vector["size"] - header
    _check_frame(enc.flush(), vector)
    assert (len(enc), enc.nbytes) == (0, 0)
    enc.extend(records)  # the encoder is reusable after flush()
    _check_frame(enc.flush(), vector)
    assert enc.flush() == b"\x01\x01\x90"


@pytest.mark.parametrize("vector", FRAME_VECTORS["frames"], ids=_ids(FRAME_VECTORS["frames"]))
def test_frame_vector_decode(speedups: ModuleType, vector: dict[str, Any]) -> None:
    records = _records(vector)
    frame = bytes.fromhex(vector["hex"]) if "hex" in vector else _speedups_py.encode_batch(records)
    _check_frame(frame, vector)
    for form in (frame, bytearray(frame), memoryview(frame)):
        decoded = speedups.decode_batch(form)
        assert type(decoded) is list
        assert decoded == records
        assert _types(decoded) == [(str, str, str, str, str, bytes, int, int)] * len(records)


def test_frame_vectors_are_msgpack() -> None:
    for vector in FRAME_VECTORS["frames"]:
        records = _records(vector)
        _check_frame(b"\x01\x01" + msgpack.packb(records, use_bin_type=True), vector)


@pytest.mark.parametrize("vector", FRAME_VECTORS["malformed"], ids=_ids(FRAME_VECTORS["malformed"]))
def test_malformed_frame_vector(speedups: ModuleType, vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["hex"])
    for form in (frame, bytearray(frame), memoryview(frame)):
        with pytest.raises(FrameDecodeError):
            speedups.decode_batch(form)


@pytest.mark.parametrize("vector", FRAME_VECTORS["noncanonical"], ids=_ids(FRAME_VECTORS["noncanonical"]))
def test_noncanonical_frame_vector(speedups: ModuleType, vector: dict[str, Any]) -> None:
    records = _records(vector)
    decoded = speedups.decode_batch(bytes.fromhex(vector["hex"]))
    assert decoded == records
    assert _types(decoded) == [(str, str, str, str, str, bytes, int, int)] * len(records)
    assert speedups.encode_batch(decoded).hex() == vector["canonical_hex"]


def test_decode_of_strided_buffer(speedups: ModuleType) -> None:
    frame = _speedups_py.encode_batch([("a", "b", "c", "d", "e", b"v", 1, 2)])
    strided = memoryview(bytes(b for x in frame for b in (x, 0)))[::2]
    assert speedups.decode_batch(strided) == [("a", "b", "c", "d", "e", b"v", 1, 2)]


def test_decode_releases_the_buffer(speedups: ModuleType) -> None:
    # A bytearray cannot be resized while a buffer export is alive: if decode_batch
    # leaked its export (on success or on error), these appends would raise BufferError.
    good = bytearray(_speedups_py.encode_batch([("a", "b", "", "", "t", b"", 0, 0)]))
    speedups.decode_batch(good)
    good.append(0)
    with pytest.raises(FrameDecodeError):
        speedups.decode_batch(good)
    good.append(0)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x01\x01\x91\x98\xdb\xff\xff\xff\xff" + b"i" * 32,  # str32 of 4 GiB
        b"\x01\x01\x91\x98\xa0\xa0\xa0\xa0\xa0\xc6\xff\xff\xff\xff" + b"\0" * 32,  # bin32 of 4 GiB
        b"\x01\x01\xdd\xff\xff\xff\xff" + b"\x98" * 64,  # 2**32 - 1 records
        b"\x01\x01\x91\xdd\xff\xff\xff\xff" + b"\xa0" * 64,  # a record of 2**32 - 1 items
    ],
    ids=["str32", "bin32", "batch-array32", "record-array32"],
)
def test_huge_claimed_length_is_a_clean_error(speedups: ModuleType, frame: bytes) -> None:
    with pytest.raises(FrameDecodeError):
        speedups.decode_batch(frame)


@pytest.mark.parametrize("bad", ["\x01\x01\x90", None, 3])
def test_decode_rejects_non_frames(speedups: ModuleType, bad: object) -> None:
    # The twin raises FrameDecodeError for a str (it indexes it) and TypeError for an
    # object without len(); the C core raises TypeError for anything not bytes-like.
    with pytest.raises((TypeError, FrameDecodeError)):
        speedups.decode_batch(bad)


# ---------------------------------------------------------------- API parity


def test_exported_names_match(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    assert c.__all__ == py.__all__
    for name in py.__all__:
        assert hasattr(c, name), name
    assert (c.FRAME_VERSION, c.KIND_BATCH) == (py.FRAME_VERSION, py.KIND_BATCH) == (1, 1)
    assert c.Record == py.Record


FUNCTIONS = ["stable_hash", "key_group", "key_groups", "partition", "encode_batch", "decode_batch", "records_bytes"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_parameter_names_match(both: tuple[ModuleType, ModuleType], name: str) -> None:
    py, c = both
    c_params = inspect.signature(getattr(c, name)).parameters
    assert list(c_params) == list(inspect.signature(getattr(py, name)).parameters)


def test_keyword_arguments(speedups: ModuleType) -> None:
    assert speedups.stable_hash(data=b"") == 0xEF46DB3751D8E999
    assert speedups.key_group(id="", max_parallelism=1024) == 0xEF46DB3751D8E999 % 1024
    assert speedups.key_groups(ids=[""], max_parallelism=128) == [0xEF46DB3751D8E999 % 128]
    assert speedups.partition(records=[], max_parallelism=4, n_peers=2) == [[], []]
    enc = speedups.BatchEncoder()
    enc.append(record=("", "", "", "", "", b"", 0, 0))
    assert speedups.decode_batch(frame=enc.flush()) == [("", "", "", "", "", b"", 0, 0)]


def test_selector() -> None:
    from statefun_mesh import _speedups

    assert _speedups.IMPLEMENTATION in ("c", "python")
    if os.environ.get("STATEFUN_MESH_NO_EXTENSIONS"):
        assert _speedups.IMPLEMENTATION == "python"
    expected = _speedups_py if _speedups.IMPLEMENTATION == "python" else c_module()
    for name in ("BatchEncoder", "decode_batch", "encode_batch", "key_group", "key_groups", "partition"):
        assert getattr(_speedups, name) is getattr(expected, name)


@pytest.mark.integration  # a process
@pytest.mark.parametrize(("env", "expected"), [({"STATEFUN_MESH_NO_EXTENSIONS": "1"}, "python"), ({}, None)])
def test_selector_environment(env: dict[str, str], expected: str | None) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STATEFUN_MESH_")}
    if expected is None:  # no override: "c" exactly when the core is built
        try:
            importlib.import_module("statefun_mesh._speedups_c")
            expected = "c"
        except ImportError:
            expected = "python"
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", "from statefun_mesh import _speedups; print(_speedups.IMPLEMENTATION)"],
        env={**clean, **env, "PYTHONPATH": root},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == expected


# ---------------------------------------------------------------- key groups, partition


@pytest.mark.parametrize("max_parallelism", [0, -1, 32769, 2**70])
def test_bad_max_parallelism(speedups: ModuleType, max_parallelism: int) -> None:
    msg = f"max_parallelism must be between 1 and 32768, got {max_parallelism}"
    with pytest.raises(ValueError, match=msg):
        speedups.key_group("x", max_parallelism)
    with pytest.raises(ValueError, match=msg):
        speedups.key_groups(["x"], max_parallelism)
    with pytest.raises(ValueError, match=msg):
        speedups.partition([], max_parallelism, 1)


@pytest.mark.parametrize("n_peers", [0, -3, 129])
def test_bad_n_peers(speedups: ModuleType, n_peers: int) -> None:
    with pytest.raises(ValueError, match=r"n_peers must be between 1 and max_parallelism \(128\)"):
        speedups.partition([], 128, n_peers)


def test_key_group_bounds(speedups: ModuleType) -> None:
    ids = [f"id-{i}" for i in range(2000)]
    assert speedups.key_groups(ids, 1) == [0] * 2000
    groups = speedups.key_groups(ids, 32768)
    assert all(0 <= g < 32768 for g in groups)
    assert len(set(speedups.key_groups(ids, 16))) == 16  # 2000 ids reach every group
    assert speedups.key_groups([], 7) == []


def test_key_group_of_non_str(speedups: ModuleType) -> None:
    # C: TypeError. The twin calls id.encode() and so raises AttributeError for
    # bytes/ints (reported; the C core does not copy that accident).
    for bad in (b"abc", 5, None):
        with pytest.raises((TypeError, AttributeError)):
            speedups.key_group(bad, 16)
        with pytest.raises((TypeError, AttributeError)):
            speedups.key_groups(["ok", bad], 16)
    with pytest.raises(UnicodeEncodeError):
        speedups.key_group("\ud800", 16)


def _random_records(rng: random.Random, n: int) -> list[tuple[Any, ...]]:
    alphabet = "abcxyz-_0123456789üé🦀"
    return [
        (
            "ns/fn",
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24))),
            "ns/caller" if i % 2 else "",
            f"c{i}" if i % 2 else "",
            "ns/T",
            rng.randbytes(rng.randrange(0, 8)),
            rng.randrange(0, 4),
            i,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(("max_parallelism", "n_peers"), [(1, 1), (128, 1), (128, 3), (1024, 4), (7, 7), (32768, 5)])
def test_partition(speedups: ModuleType, max_parallelism: int, n_peers: int) -> None:
    records = _random_records(random.Random(max_parallelism * 31 + n_peers), 600)
    parts = speedups.partition(iter(records), max_parallelism, n_peers)
    assert type(parts) is list and len(parts) == n_peers
    expected: list[list[Any]] = [[] for _ in range(n_peers)]
    for rec in records:
        kg = speedups.key_group(rec[1], max_parallelism)
        expected[kg * n_peers // max_parallelism].append(rec)
    assert parts == expected  # right peer, input order kept
    for part, exp in zip(parts, expected, strict=True):
        assert all(a is b for a, b in zip(part, exp, strict=True))  # the same objects, not copies


def test_partition_contiguous_ranges(speedups: ModuleType) -> None:
    # Flink's key-group ranges: peer p owns a contiguous run of key groups.
    ids = [f"k{i}" for i in range(3000)]
    records = [("t", i, "", "", "v", b"", 0, 0) for i in ids]
    parts = speedups.partition(records, 64, 5)
    ranges = [sorted({speedups.key_group(r[1], 64) for r in part}) for part in parts]
    flat = [kg for r in ranges for kg in r]
    assert flat == sorted(flat) == list(range(64))


def test_partition_accepts_any_indexable_record(speedups: ModuleType) -> None:
    rec = ["t", "id", "", "", "v", b"", 0, 0]
    parts = speedups.partition([rec], 16, 2)
    flat = [r for part in parts for r in part]
    assert flat == [rec] and flat[0] is rec
    with pytest.raises(IndexError):
        speedups.partition([("only-one-field",)], 16, 2)


def test_partition_agrees(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    records = _random_records(random.Random(7), 2000)
    for mp, n in [(1024, 4), (128, 128), (3, 2)]:
        assert c.partition(records, mp, n) == py.partition(records, mp, n)


# ---------------------------------------------------------------- the encoder


GOOD = ("ns/fn", "id", "ns/caller", "cid", "ns/T", b"\x00\x01", 1, 2)


class _Str(str):
    pass


class _Bytes(bytes):
    pass


_Rec = namedtuple("_Rec", "a b c d e f g h")


def _with(i: int, v: object) -> tuple[Any, ...]:
    rec = list(GOOD)
    rec[i] = v
    return tuple(rec)


BAD_RECORDS = {
    "list": list(GOOD),
    "seven-fields": GOOD[:7],
    "nine-fields": (*GOOD, 0),
    "empty-tuple": (),
    "namedtuple": _Rec(*GOOD),
    "none": None,
    "str": "record",
    "field0-bytes": _with(0, b"ns/fn"),
    "field1-int": _with(1, 1),
    "field4-none": _with(4, None),
    "field3-str-subclass": _with(3, _Str("cid")),
    "value-str": _with(5, "x"),
    "value-bytearray": _with(5, bytearray(b"x")),
    "value-memoryview": _with(5, memoryview(b"x")),
    "value-bytes-subclass": _with(5, _Bytes(b"x")),
    "reply-peer-negative": _with(6, -1),
    "reply-peer-2**64": _with(6, 2**64),
    "request-id-huge": _with(7, 2**200),
    "request-id-float": _with(7, 1.0),
    "request-id-bool": _with(7, True),
    "request-id-none": _with(7, None),
    "request-id-str": _with(7, "1"),
}


@pytest.mark.parametrize("record", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_encoder_rejects_bad_record(speedups: ModuleType, record: object) -> None:
    enc = speedups.BatchEncoder()
    enc.append(GOOD)
    size = enc.nbytes
    with pytest.raises(TypeError):
        enc.append(record)
    with pytest.raises(TypeError):
        enc.extend([GOOD, record, GOOD])  # the first one goes in, the rest does not
    with pytest.raises(TypeError):
        speedups.encode_batch([GOOD, record])
    assert (len(enc), enc.nbytes) == (2, 2 * size)  # nothing of a bad record was kept
    assert enc.flush() == speedups.encode_batch([GOOD, GOOD])


def test_encoder_error_messages_match(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    for record in BAD_RECORDS.values():
        with pytest.raises(TypeError) as py_err:
            py.BatchEncoder().append(record)
        with pytest.raises(TypeError) as c_err:
            c.BatchEncoder().append(record)
        assert str(c_err.value) == str(py_err.value)


def test_encoder_rejects_surrogates(speedups: ModuleType) -> None:
    enc = speedups.BatchEncoder()
    with pytest.raises(UnicodeEncodeError):
        enc.append(_with(4, "bad \udc80"))
    assert (len(enc), enc.nbytes) == (0, 0)


def test_encoder_array32_header(speedups: ModuleType) -> None:
    records = [("t", str(i), "", "", "v", b"", i, 0) for i in range(65536)]
    frame = speedups.encode_batch(records)
    assert frame[:7] == b"\x01\x01\xdd\x00\x01\x00\x00"
    assert frame == b"\x01\x01" + msgpack.packb(records, use_bin_type=True)
    assert speedups.decode_batch(frame) == records


def test_encoder_matches_msgpack_on_random_records(speedups: ModuleType) -> None:
    rng = random.Random(1234)
    widths = [0, 1, 31, 32, 255, 256, 300, 65535, 65536]
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, U64]
    records = [
        (
            "x" * rng.choice(widths[:6]),
            "é" * rng.choice(widths[:7]),
            "",
            "🦀" * rng.randrange(0, 70),
            "t" * rng.choice(widths),
            rng.randbytes(rng.choice(widths)),
            rng.choice(ints),
            rng.randrange(0, U64 + 1),
        )
        for _ in range(60)
    ]
    enc = speedups.BatchEncoder()
    for rec in records:
        before = enc.nbytes
        enc.append(rec)
        assert enc.nbytes - before == len(msgpack.packb(rec, use_bin_type=True))
    assert enc.flush() == b"\x01\x01" + msgpack.packb(records, use_bin_type=True)


# ---------------------------------------------------------------- fuzz: C vs twin


def _outcome(mod: ModuleType, frame: bytes) -> tuple[str, Any]:
    try:
        records = mod.decode_batch(frame)
    except FrameDecodeError:
        return ("rejected", None)
    return ("accepted", (records, _types(records)))


def _assert_agree(py: ModuleType, c: ModuleType, frame: bytes) -> str:
    expected = _outcome(py, frame)
    assert _outcome(c, frame) == expected, frame.hex()
    return expected[0]


class _FrameFuzzer:
    """Random batch frames, mostly well-formed in shape, in every msgpack width."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _len_header(self, n: int, fix: int | None, fix_max: int, codes: tuple[int, ...]) -> bytes:
        # A random width that can hold n (fix, 8-bit, 16-bit, 32-bit), like a
        # non-canonical encoder would; codes holds the 8/16/32-bit type bytes (0 = none).
        options = []
        if fix is not None and n <= fix_max:
            options.append(bytes([fix | n]))
        for code, size in zip(codes, (1, 2, 4), strict=True):
            if code and n < 1 << (8 * size):
                options.append(bytes([code]) + n.to_bytes(size, "big"))
        return self.rng.choice(options)

    def text(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.6:
            raw = "".join(rng.choice("ab-_/0ü€🦀") for _ in range(rng.choice([0, 1, 5, 31, 40]))).encode()
        elif kind < 0.7:
            raw = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"a\x80"])
        else:
            raw = b"t" * rng.choice([0, 3, 300])
        return self._len_header(len(raw), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + raw

    def binary(self) -> bytes:
        raw = self.rng.randbytes(self.rng.choice([0, 1, 17, 256]))
        return self._len_header(len(raw), None, 0, (0xC4, 0xC5, 0xC6)) + raw

    def integer(self) -> bytes:
        rng = self.rng
        v = rng.choice([0, 1, 127, 128, 255, 256, 65535, 2**31 - 1, 2**32, 2**63 - 1, 2**63, U64, -1, -32, -33, -129])
        options = []
        if 0 <= v <= 127:
            options.append(bytes([v]))
        if -32 <= v < 0:
            options.append(v.to_bytes(1, "big", signed=True))
        for code, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if 0 <= v < 1 << (8 * size):
                options.append(bytes([code]) + v.to_bytes(size, "big"))
        for code, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if -(1 << (8 * size - 1)) <= v < 1 << (8 * size - 1):
                options.append(bytes([code]) + v.to_bytes(size, "big", signed=True))
        return rng.choice(options)

    def wrong(self) -> bytes:
        return self.rng.choice(
            [
                b"\xc0",
                b"\xc2",
                b"\xc3",
                b"\xca\0\0\0\0",
                b"\xcb" + b"\0" * 8,
                b"\x90",
                b"\x80",
                b"\xd4\x01\x00",
                b"\xc7\x01\x05\x00",
                b"\xd6\xff\0\0\0\0",
                b"\xc1",
                b"\xa1a",
                b"\xc4\x01a",
                b"\x05",
            ]
        )

    def record(self) -> bytes:
        rng = self.rng
        fields = [self.text() for _ in range(5)] + [self.binary(), self.integer(), self.integer()]
        if rng.random() < 0.15:
            fields[rng.randrange(8)] = self.wrong()
        if rng.random() < 0.03:
            del fields[rng.randrange(8)]
        elif rng.random() < 0.03:
            fields.append(self.integer())
        return self._len_header(len(fields), 0x90, 15, (0, 0xDC, 0xDD)) + b"".join(fields)

    def frame(self) -> bytes:
        rng = self.rng
        n = rng.choice([0, 1, 2, 3, 15, 16, 17])
        declared = n if rng.random() < 0.9 else max(0, n + rng.choice([-1, 1]))
        body = self._len_header(declared, 0x90, 15, (0, 0xDC, 0xDD)) + b"".join(self.record() for _ in range(n))
        if rng.random() < 0.03:
            body += rng.choice([b"\x00", b"\x90", b"\xc0"])
        return b"\x01\x01" + body


def test_fuzz_random_frames(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    fuzzer = _FrameFuzzer(random.Random(20240611))
    seen = {"accepted": 0, "rejected": 0}
    for _ in range(2000):
        seen[_assert_agree(py, c, fuzzer.frame())] += 1
    # The fuzzer must exercise both outcomes, or this test proves little.
    assert seen["accepted"] > 300 and seen["rejected"] > 300, seen


def test_fuzz_random_bytes(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    rng = random.Random(99)
    for _ in range(2000):
        head = rng.choice([b"\x01\x01", b"\x01\x01\x91\x98", b"\x01\x01\x91", b""])
        _assert_agree(py, c, head + rng.randbytes(rng.randrange(0, 40)))


def _real_frames() -> list[bytes]:
    rng = random.Random(5)
    frames = [_speedups_py.encode_batch(_random_records(rng, n)) for n in (1, 3, 17)]
    frames += [bytes.fromhex(v["hex"]) for v in FRAME_VECTORS["frames"] if "hex" in v and v["size"] < 1000]
    frames += [bytes.fromhex(v["hex"]) for v in FRAME_VECTORS["noncanonical"]]
    return frames


def test_fuzz_truncations(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    for frame in _real_frames():
        assert _assert_agree(py, c, frame) == "accepted"
        for cut in range(len(frame)):
            assert _assert_agree(py, c, frame[:cut]) == "rejected"


def test_fuzz_byte_flips(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    rng = random.Random(31337)
    frames = _real_frames()
    for _ in range(3000):
        frame = bytearray(rng.choice(frames))
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            pos = rng.randrange(len(frame))
            if rng.random() < 0.5:
                frame[pos] = rng.randrange(256)
            else:
                frame[pos] ^= 1 << rng.randrange(8)
        _assert_agree(py, c, bytes(frame))


def test_error_messages_name_the_problem(both: tuple[ModuleType, ModuleType]) -> None:
    _, c = both
    with pytest.raises(FrameDecodeError, match="record 0 field 5"):
        c.decode_batch(bytes.fromhex("0101 91 98 a174 a0 a0 a0 a0 a0 00 00".replace(" ", "")))
    with pytest.raises(FrameDecodeError, match="record 1 field 2 is not valid UTF-8") as err:
        c.decode_batch(bytes.fromhex("0101 92 98a0a0a0a0a0c4000000 98a0a0a1ffa0a0c4000000".replace(" ", "")))
    assert isinstance(err.value.__cause__, UnicodeDecodeError)
    with pytest.raises(FrameDecodeError, match="unsupported frame version 2"):
        c.decode_batch(b"\x02\x01\x90")


# ---------------------------------------------------------------- records_bytes (inbox accounting)


def test_records_bytes_is_memory_records_bytes(speedups: ModuleType) -> None:
    from statefun_mesh.memory import RECORD_OVERHEAD, records_bytes

    rng = random.Random(11)
    records = _random_records(rng, 300)
    assert speedups.records_bytes(records) == records_bytes(records)
    assert speedups.records_bytes(collections.deque(records)) == records_bytes(records)
    assert speedups.records_bytes(iter(records[:7])) == records_bytes(records[:7])
    assert speedups.records_bytes([]) == 0
    # ids count in code points, values in bytes, plus the overhead per record
    rec = ("t", "\u00e9\u4e2d", "", "", "v", b"abc", 0, 0)
    assert speedups.records_bytes([rec, rec]) == 2 * (2 + 3 + RECORD_OVERHEAD)
    # not a record tuple: len() of the same items, or the spec's error
    assert speedups.records_bytes([["a", "bb", 0, 0, 0, b"xyz"]]) == 2 + 3 + RECORD_OVERHEAD
    for bad in ([("t",)], [5], [("t", 3, "", "", "", b"")], [("t", "i", "", "", "", None)]):
        with pytest.raises((IndexError, TypeError)) as want:
            records_bytes(bad)
        with pytest.raises(want.type, match=str(want.value)):
            speedups.records_bytes(bad)


def test_decode_shares_repeated_callers_and_values() -> None:
    """The C decoder reuses the previous record's caller id and value when they repeat (one
    function's sends, the same message to many ids): two objects fewer per record, equal records."""
    c = c_module()
    records = [
        ("perf/counter", f"k{i}", "perf/driver", "d0", "io.statefun.types/int", b"\x08\x01", 0, i) for i in range(50)
    ]
    records[20] = (*records[20][:3], "d1", records[20][4], b"\x08\x02", 0, 20)  # a change breaks the run
    out = c.decode_batch(c.encode_batch(records))
    assert out == records == _speedups_py.decode_batch(c.encode_batch(records))
    assert all(out[i][3] is out[0][3] and out[i][5] is out[0][5] for i in range(1, 20))
    assert out[20][3] == "d1" and out[20][5] == b"\x08\x02"
    assert all(out[i][3] is out[21][3] and out[i][5] is out[21][5] for i in range(22, 50))
    assert out[21][3] == "d0" and out[21][5] == b"\x08\x01"


# ---------------------------------------------------------------- memory


def test_no_leaks(speedups: ModuleType) -> None:
    records = _random_records(random.Random(3), 50)
    frame = speedups.encode_batch(records)
    bad_frames = [bytes.fromhex(v["hex"]) for v in FRAME_VECTORS["malformed"]]

    def workload() -> None:
        enc = speedups.BatchEncoder()
        enc.extend(records)
        enc.flush()
        enc.extend(records)  # dropped unflushed: __dealloc__ frees the buffer
        speedups.encode_batch(records)
        speedups.decode_batch(frame)
        speedups.decode_batch(bytearray(frame))
        speedups.partition(records, 128, 3)
        speedups.key_groups([r[1] for r in records], 128)
        speedups.records_bytes(records)
        for bad in bad_frames:
            with contextlib.suppress(FrameDecodeError):
                speedups.decode_batch(bad)
        for bad in BAD_RECORDS.values():
            with contextlib.suppress(TypeError):
                enc.append(bad)

    for _ in range(20):  # warm caches (interned strings, free lists)
        workload()
    gc.collect()
    tracemalloc.start()
    try:
        workload()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            workload()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A leak of one record (or one buffer) per iteration would be > 20 kB.
    assert grown < 16_000, grown


def test_encoder_does_not_hoard_a_big_buffer(speedups: ModuleType) -> None:
    enc = speedups.BatchEncoder()
    big = ("t", "id", "", "", "v", bytes(4 << 20), 0, 0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        enc.append(big)
        assert tracemalloc.get_traced_memory()[0] - base > 4 << 20
        frame = enc.flush()
        del frame
        # After flushing a 4 MiB batch the encoder must not keep a 4 MiB buffer around.
        assert tracemalloc.get_traced_memory()[0] - base < 1 << 20
    finally:
        tracemalloc.stop()
    enc.append(GOOD)
    assert enc.flush() == speedups.encode_batch([GOOD])


def test_refcounts_are_balanced(speedups: ModuleType) -> None:
    rec = ("t/fn", "id-refcount", "", "", "t/v", b"value", 1, 2**40)
    frame = speedups.encode_batch([rec, rec])
    watched = [rec, frame, *rec[:6], rec[7]]
    gc.collect()  # tracebacks of caught errors sit in reference cycles until collected
    before = [sys.getrefcount(x) for x in watched]
    for _ in range(100):
        enc = speedups.BatchEncoder()
        enc.append(rec)
        enc.flush()
        out = speedups.decode_batch(frame)
        speedups.partition([rec, rec], 16, 2)
        speedups.key_group(rec[1], 16)
        for bad in (_with(7, -1), _with(5, "x"), (*rec, 0)):
            with pytest.raises(TypeError):
                enc.append(bad)
        with pytest.raises(FrameDecodeError):
            speedups.decode_batch(frame[:-1])
        del enc, out, bad  # `bad` shares fields with rec
    gc.collect()
    assert [sys.getrefcount(x) for x in watched] == before
