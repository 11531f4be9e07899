"""Hypothesis strategies and mutators for frames, shared by the fuzz tests.

``tests/unit/test_fuzz_frames.py`` runs them through the decoders of both cores;
``tests/integration/test_fuzz_endpoints.py`` sends them to a real peer's endpoints.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
from hypothesis import strategies as st

from statefun_mesh import _speedups_py
from statefun_mesh.transport import codec

U64 = 2**64 - 1

INTERESTING_UINTS = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64]
uints = st.one_of(st.sampled_from(INTERESTING_UINTS), st.integers(0, U64))
_short_texts = st.one_of(
    st.sampled_from(["", "it/counter", "io.statefun.types/int", "shop/cart", "user-1", "é", "🦀"]),
    st.text(max_size=40),  # any code point but surrogates (those cannot be in a str that encodes)
    st.builds(lambda c, n: c * n, st.sampled_from("a€🐍"), st.sampled_from([8, 31, 32, 64])),
)
#: the str8/str16/str32 boundaries (in bytes); 1 draw in 20, as they make the frames big
_long_texts = st.builds(lambda n: "a" * n, st.sampled_from([255, 256, 0xFFFF, 0x10000]))
_long_values = st.builds(lambda n: b"\xab" * n, st.sampled_from([255, 256, 0xFFFF, 0x10000]))
texts = _short_texts
values = st.binary(max_size=48)
records = st.tuples(texts, texts, texts, texts, texts, values, uints, uints)
record_lists = st.lists(records, max_size=6) | st.lists(records, min_size=15, max_size=17)


class Writer:
    """A msgpack writer that picks any valid width for each header (non-canonical too).

    The decoders accept any valid msgpack of the frame's shape, so the fuzz must reach
    the non-minimal encodings as well as ``msgpack.packb``'s canonical ones.
    """

    def __init__(self, rng: random.Random, canonical: bool) -> None:
        self.rng = rng
        self.canonical = canonical

    def _pick(self, options: list[bytes]) -> bytes:
        return options[0] if self.canonical else self.rng.choice(options)

    def array(self, n: int) -> bytes:
        opts = [bytes((0x90 | n,))] if n < 16 else []
        if n < 0x10000:
            opts.append(b"\xdc" + n.to_bytes(2, "big"))
        opts.append(b"\xdd" + n.to_bytes(4, "big"))
        return self._pick(opts)

    def _sized(self, data: bytes, code8: int, fix: int | None) -> bytes:
        n = len(data)
        opts = [bytes((fix | n,))] if fix is not None and n < 32 else []
        if n < 0x100:
            opts.append(bytes((code8, n)))
        if n < 0x10000:
            opts.append(bytes((code8 + 1,)) + n.to_bytes(2, "big"))
        opts.append(bytes((code8 + 2,)) + n.to_bytes(4, "big"))
        return self._pick(opts) + data

    def str(self, s: str) -> bytes:
        return self._sized(s.encode("utf-8"), 0xD9, 0xA0)

    def bin(self, b: bytes) -> bytes:
        return self._sized(b, 0xC4, None)

    def uint(self, v: int) -> bytes:
        opts = [bytes((v,))] if v < 0x80 else []
        for size, code, scode in ((1, 0xCC, 0xD0), (2, 0xCD, 0xD1), (4, 0xCE, 0xD2), (8, 0xCF, 0xD3)):
            if v < 1 << (8 * size):
                opts.append(bytes((code,)) + v.to_bytes(size, "big"))
            if v < 1 << (8 * size - 1):
                opts.append(bytes((scode,)) + v.to_bytes(size, "big"))  # a non-negative signed int
        return self._pick(opts)

    def record(self, rec: tuple[Any, ...]) -> bytes:
        parts = [self.str(rec[i]) for i in range(5)] + [self.bin(rec[5]), self.uint(rec[6]), self.uint(rec[7])]
        return self.array(8) + b"".join(parts)

    def frame(self, recs: list[tuple[Any, ...]]) -> bytes:
        return b"\x01\x01" + self.array(len(recs)) + b"".join(self.record(r) for r in recs)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    recs = draw(record_lists)
    if recs and draw(st.integers(0, 9)) == 0:  # one long field (they make a frame big: 1 frame in 10)
        i, field = draw(st.integers(0, len(recs) - 1)), draw(st.integers(0, 5))
        rec = list(recs[i])
        rec[field] = draw(_long_values if field == 5 else _long_texts)
        recs[i] = tuple(rec)
    canonical = draw(st.booleans())
    frame = Writer(random.Random(draw(st.integers(0, 2**32))), canonical).frame(recs)
    if canonical:
        assert frame == _speedups_py.encode_batch(recs)
    return frame


#: arbitrary msgpack documents: what a field of the wrong type may hold
msgpack_objects = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), U64),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def wrong_type_frames(draw: st.DrawFn) -> bytes:
    """A frame of msgpack-encoded records where some fields (or records, or the body) are
    of the wrong type, or records have the wrong number of fields."""
    recs: list[Any] = [list(r) for r in draw(st.lists(records, min_size=1, max_size=4))]
    for _ in range(draw(st.integers(1, 3))):
        rec = recs[draw(st.integers(0, len(recs) - 1))]
        if type(rec) is not list:
            continue
        how = draw(st.sampled_from(["replace", "replace", "replace", "drop", "add", "whole"]))
        if how == "replace" and rec:
            rec[draw(st.integers(0, len(rec) - 1))] = draw(msgpack_objects)
        elif how == "drop" and rec:
            del rec[draw(st.integers(0, len(rec) - 1))]
        elif how in ("add", "replace"):
            rec.append(draw(msgpack_objects))
        else:
            recs[draw(st.integers(0, len(recs) - 1))] = draw(msgpack_objects)
    body: Any = recs
    if draw(st.integers(0, 9)) == 0:
        body = draw(msgpack_objects)  # not even an array
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (ValueError, OverflowError):  # e.g. an ExtType code msgpack refuses
        packed = b"\xc1"
    return b"\x01\x01" + packed


@st.composite
def nested_frames(draw: st.DrawFn) -> bytes:
    """Deep nesting: arrays (or maps) inside arrays, thousands deep, where records or fields belong."""
    depth = draw(st.sampled_from([2, 10, 100, 1000, 5000, 100_000]))
    opener = draw(st.sampled_from([b"\x91", b"\xdc\x00\x01", b"\x81\xa0", b"\x98"]))
    prefix = draw(st.sampled_from([b"", b"\x91", b"\x91\x98", b"\x91\x98\xa0"]))
    return b"\x01\x01" + prefix + opener * depth + draw(st.sampled_from([b"\x90", b"\xc0", b""]))


#: headers that claim far more than any frame holds
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff",
    b"\xdd\x7f\xff\xff\xff",
    b"\xdc\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xda\xff\xff",
    b"\xd9\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\xc5\xff\xff",
    b"\xc4\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xde\xff\xff",
    b"\xc9\xff\xff\xff\xff\x00",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
]
INTERESTING_BYTES = [
    0x00,
    0x01,
    0x7F,
    0x80,
    0x90,
    0x98,
    0x9F,
    0xA0,
    0xBF,
    0xC0,
    0xC1,
    0xC2,
    0xC4,
    0xC5,
    0xC6,
    0xCC,
    0xCF,
    0xD0,
    0xD3,
    0xD9,
    0xDA,
    0xDB,
    0xDC,
    0xDD,
    0xDE,
    0xDF,
    0xE0,
    0xFF,
]

positions = st.integers(0, 2**16)
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set"), positions, st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=6)),
    st.tuples(st.just("delete"), positions, st.integers(1, 9)),
    st.tuples(st.just("header"), positions, st.sampled_from(HUGE_HEADERS)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=6) | st.sampled_from([b"\xc0", b"\x90", b"\x00"])),
    st.tuples(st.just("duplicate"), positions, st.integers(1, 40)),
    st.tuples(st.just("leaf"), positions, st.integers(0, 2**16)),
)

#: values a "leaf" mutation puts in place of one item of a frame's msgpack body: the frame stays
#: well-formed msgpack, often of the right shape, with a value at an edge or of the wrong type
INTERESTING_LEAVES: list[Any] = [
    0,
    1,
    -1,
    2,
    99,
    2**31 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    0.0,
    -1.5,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    "",
    "it/counter",
    "io.statefun.types/int",
    "x" * 300,
    "\u00e9",
    b"",
    b"\x00\x00\x00\x01",
    b"x" * 300,
    [],
    [0],
    {},
    {"": 0},
    ["a", "b", "", "", "c/d", b"", 0, 0],
]


def _leaf_paths(obj: Any, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    if isinstance(obj, list):
        out = [path] if path else []
        for i, item in enumerate(obj):
            out += _leaf_paths(item, (*path, i))
        return out
    return [path]


def _replace_leaf(frame: bytes, where: int, which: int) -> bytes:
    """Replace one item (any depth) of the msgpack body after a frame's header with an interesting value."""
    off = 6 if len(frame) > 6 and frame[4] == 1 and frame[0] != 1 else 2  # after a generation prefix, or not
    try:
        body = msgpack.unpackb(frame[off:], raw=False, strict_map_key=False)
    except Exception:
        return frame  # not msgpack: nothing to replace
    paths = _leaf_paths(body)
    if not isinstance(body, list) or not paths:
        return frame
    path = paths[where % len(paths)]
    parent = body
    for i in path[:-1]:
        parent = parent[i]
    parent[path[-1]] = INTERESTING_LEAVES[which % len(INTERESTING_LEAVES)]
    return frame[:off] + msgpack.packb(body, use_bin_type=True)


def mutate(frame: bytes, op: tuple[Any, ...]) -> bytes:
    """Apply one mutation (positions wrap around the frame's length)."""
    n = len(frame)
    kind = op[0]
    if kind == "append":
        return frame + op[1]
    pos = op[1] % (n + 1)
    if kind == "truncate":
        return frame[:pos]
    if kind == "insert":
        return frame[:pos] + op[2] + frame[pos:]
    if kind == "delete":
        return frame[:pos] + frame[pos + op[2] :]
    if kind == "header":
        return frame[:pos] + op[2] + frame[pos + len(op[2]) :]
    if kind == "duplicate":
        return frame[:pos] + frame[pos : pos + op[2]] + frame[pos:]
    if kind == "leaf":
        return _replace_leaf(frame, op[1], op[2])
    if n == 0:
        return frame
    pos %= n
    byte = frame[pos] ^ (1 << op[2]) if kind == "flip" else op[2]  # else: set
    return frame[:pos] + bytes((byte,)) + frame[pos + 1 :]


raw_frames = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from([b"\x01\x01", b"\x01\x01\x91", b"\x01\x01\x91\x98"]),
        st.binary(max_size=64),
    ),
)
base_frames = st.one_of(valid_frames(), wrong_type_frames(), nested_frames(), raw_frames)


def random_mutation(rng: random.Random) -> tuple[Any, ...]:
    """One mutation of the kinds above, drawn from ``rng`` (the derived mutants of an example)."""
    kind = rng.choice(
        ["flip", "flip", "set", "set", "truncate", "insert", "delete", "header", "append", "duplicate", "leaf", "leaf"]
    )
    pos = rng.randrange(2**16)
    if kind == "flip":
        return kind, pos, rng.randrange(8)
    if kind == "set":
        return kind, pos, rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
    if kind == "truncate":
        return kind, pos
    if kind == "insert":
        return kind, pos, rng.randbytes(rng.randint(1, 6))
    if kind == "delete":
        return kind, pos, rng.randint(1, 9)
    if kind == "header":
        return kind, pos, rng.choice(HUGE_HEADERS)
    if kind == "append":
        return (kind, rng.randbytes(rng.randint(1, 6)))
    if kind == "leaf":
        return kind, pos, rng.randrange(2**16)
    return kind, pos, rng.randint(1, 40)


#: mutants derived from each Hypothesis example (drawing a structured frame costs ~10 ms,
#: decoding one ~20 us: so each example is spent on many inputs, all reproducible from it)
MUTANTS = 100


def derived_inputs(base: bytes, ops: list[Any], seed: int, mutants: int) -> list[bytes]:
    """What one example runs: ``base``; each of ``ops`` applied on top of the previous; then
    ``mutants`` mutants of ``base``, each 1-3 mutations drawn from ``seed``."""
    frames = [base]
    for op in ops:
        frames.append(mutate(frames[-1], op))
    rng = random.Random(seed)
    for _ in range(mutants):
        frame = base
        for _ in range(rng.choice((1, 1, 2, 3))):
            frame = mutate(frame, random_mutation(rng))
        frames.append(frame)
    return frames


# ---------------------------------------------------------------- control frames

_I = st.integers(-(2**63), U64)
_S = st.text(max_size=12)
#: type names: the integration app's (tests/integration/app.py), other valid ones, and any text
_T = st.sampled_from(["it/counter", "it/nope", "io.statefun.types/int", "it/out", "statefun-mesh/dead-letters"]) | _S
_B = st.binary(max_size=12)
_ANY = msgpack_objects
#: per kind, strategies for items of the right types (what the shape table allows)
CONTROL_ITEMS: dict[int, list[Any]] = {
    codec.CREDIT: [_I],
    codec.HEARTBEAT: [_I, _I],
    codec.REPLIES: [st.lists(st.lists(_ANY, max_size=7), max_size=3)],
    codec.BARRIER: [_I, _I],
    codec.CK_ACK: [_I, st.none() | st.dictionaries(_S, _ANY, max_size=3), st.none() | _S],
    codec.CK_DONE: [_I],
    codec.CK_ABORT: [_I],
    codec.RECOVER: [_I, _I],
    codec.READY: [_I],
    codec.RESUME: [_I],
    codec.RESTORE_FAILED: [_I, _I, _S],
    codec.REPLAYED: [_I],
    codec.C_SEND: [_I, _T, _S, _T, _B, _S],
    codec.C_REQUEST: [_I, _T, _S, _T, _B, _I | st.floats()],
    codec.C_FETCH: [_I, _T, _I | _S | st.sampled_from(["earliest", "latest"]), _I, _I, _I],
    codec.C_INFO: [_I],
    codec.R_ACK: [_I],
    codec.R_REPLY: [_I, _S, _S, _S, _B],
    codec.R_ERROR: [_I, _S, _S, st.lists(_ANY, max_size=3)],
    codec.R_RECORDS: [_I, _I, _I, st.lists(st.lists(_ANY, max_size=4), max_size=3), _I],
    codec.R_INFO: [_I, st.dictionaries(_S, _ANY, max_size=4)],
}
PEER_KINDS = frozenset(k for k in CONTROL_ITEMS if k < codec.C_SEND)
CLIENT_KINDS = frozenset({codec.C_SEND, codec.C_REQUEST, codec.C_FETCH, codec.C_INFO})


@st.composite
def control_frames(draw: st.DrawFn, kinds: st.SearchStrategy[int] | None = None) -> bytes:
    """A control frame of a kind from ``kinds`` (default: any byte, mostly the known kinds):
    items of the documented types, or 1 time in 4 with one wrong, missing or extra item."""
    if kinds is None:
        kinds = st.sampled_from(sorted(CONTROL_ITEMS)) | st.integers(0, 255)
    kind = draw(kinds)
    shape = CONTROL_ITEMS.get(kind, [])
    items = [draw(s) for s in shape]
    if not shape or draw(st.integers(0, 3)) == 0:  # wrong types, counts or bodies
        how = draw(st.sampled_from(["replace", "drop", "add", "body"]))
        if how == "replace" and items:
            items[draw(st.integers(0, len(items) - 1))] = draw(_ANY)
        elif how == "drop" and items:
            items.pop()
        elif how == "add":
            items.append(draw(_ANY))
        else:
            items = draw(_ANY)
    try:
        body = msgpack.packb(items, use_bin_type=True)
    except (ValueError, OverflowError):
        body = b"\xc1"
    return bytes((1, kind)) + body
