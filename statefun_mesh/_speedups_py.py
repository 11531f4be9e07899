"""Pure-Python twin of the Cython core: the executable specification of the hot path.

``csrc/_speedups_c.pyx`` implements exactly this module, bit for bit; the golden
vectors in ``tests/data/`` pin both. Read this file to learn the formats.

Partitioning
------------
``stable_hash(data)`` is **xxHash64** (XXH64) of ``data`` with seed ``0``: the public,
widely implemented 64-bit hash, so any language can compute where an id lives.
An address's key group is ``stable_hash(id.encode("utf-8")) % max_parallelism``:
only the id is hashed (as in StateFun), so every function of one entity shares a
key group and therefore a peer. Key group ``kg`` belongs to peer
``kg * n_peers // max_parallelism`` (Flink's contiguous key-group ranges).

Batch frames
------------
A batch of messages travels as one frame::

    frame  = VERSION (1 byte, = 1) | KIND_BATCH (1 byte, = 0x01) | body
    body   = msgpack array of records
    record = msgpack array of exactly 8 items:
             [target_typename: str, target_id: str,
              caller_typename: str, caller_id: str,     ("" and "" when no caller)
              value_typename: str, value: bin,
              reply_peer: uint, request_id: uint]       (request_id 0: not a request)

The msgpack encoding is the canonical, smallest one (what ``msgpack.packb(obj,
use_bin_type=True)`` produces): fixarray/array16/array32 headers, fixstr/str8/str16/
str32 for text, bin8/bin16/bin32 for the value, positive fixint/uint8/16/32/64 for
integers. A decoder accepts any valid msgpack encoding of exactly that shape (also
non-minimal widths) with nothing after it; anything else (truncation, trailing bytes,
invalid UTF-8, a negative or non-integer number, a str where bin belongs, a wrong item
count) is a :class:`~statefun_mesh.errors.FrameDecodeError` naming what was wrong.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Final

import msgpack

from ._dispatch_loop import collect_puts, dispatch_groups, group_records, invoke_sync, load_cells
from .errors import FrameDecodeError
from .memory import records_bytes  # the spec of the core's records_bytes

__all__ = [
    "FRAME_VERSION",
    "KIND_BATCH",
    "BatchEncoder",
    "Record",
    "collect_puts",
    "decode_batch",
    "dispatch_groups",
    "encode_batch",
    "group_records",
    "invoke_sync",
    "key_group",
    "key_groups",
    "load_cells",
    "partition",
    "record_size",
    "records_bytes",
    "stable_hash",
]

FRAME_VERSION: Final = 1
KIND_BATCH: Final = 0x01
_HEADER: Final = bytes((FRAME_VERSION, KIND_BATCH))
RECORD_FIELDS: Final = 8

#: One message on the wire: (target_typename, target_id, caller_typename, caller_id,
#: value_typename, value, reply_peer, request_id).
Record = tuple[str, str, str, str, str, bytes, int, int]

_M64: Final = 0xFFFFFFFFFFFFFFFF
_P1: Final = 0x9E3779B185EBCA87
_P2: Final = 0xC2B2AE3D27D4EB4F
_P3: Final = 0x165667B19E3779F9
_P4: Final = 0x85EBCA77C2B2AE63
_P5: Final = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M64
    return (_rotl(acc, 31) * _P1) & _M64


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _M64


def stable_hash(data: bytes) -> int:
    """Return XXH64(data, seed=0) as an unsigned 64-bit int.

    Args:
        data: the bytes to hash (for routing, the UTF-8 encoding of an address id).
    """
    if type(data) is not bytes:
        data = memoryview(data).tobytes()  # any buffer, hashed as its raw bytes
    n = len(data)
    mv = memoryview(data)
    i = 0
    if n >= 32:
        v1 = (_P1 + _P2) & _M64
        v2 = _P2
        v3 = 0
        v4 = (-_P1) & _M64
        limit = n - 32
        while i <= limit:
            v1 = _round(v1, int.from_bytes(mv[i : i + 8], "little"))
            v2 = _round(v2, int.from_bytes(mv[i + 8 : i + 16], "little"))
            v3 = _round(v3, int.from_bytes(mv[i + 16 : i + 24], "little"))
            v4 = _round(v4, int.from_bytes(mv[i + 24 : i + 32], "little"))
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M64
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = _P5
    h = (h + n) & _M64
    while i + 8 <= n:
        k1 = _round(0, int.from_bytes(mv[i : i + 8], "little"))
        h ^= k1
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(mv[i : i + 4], "little") * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h ^= (mv[i] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    h ^= h >> 32
    return h


def _check_parallelism(max_parallelism: int) -> None:
    operator.index(max_parallelism)  # a TypeError for floats and other non-integers
    if not 1 <= max_parallelism <= 32768:
        raise ValueError(f"max_parallelism must be between 1 and 32768, got {max_parallelism}")


def key_group(id: str, max_parallelism: int) -> int:
    """Return the key group of an address id: ``stable_hash(utf8(id)) % max_parallelism``."""
    _check_parallelism(max_parallelism)
    if type(id) is not str:
        raise TypeError(f"an id must be a str, got {type(id).__name__}")
    return stable_hash(id.encode("utf-8")) % max_parallelism


def key_groups(ids: Iterable[str], max_parallelism: int) -> list[int]:
    """Return ``[key_group(id, max_parallelism) for id in ids]``."""
    _check_parallelism(max_parallelism)
    return [stable_hash(i.encode("utf-8")) % max_parallelism for i in ids]


def partition(records: Iterable[Record], max_parallelism: int, n_peers: int) -> list[list[Record]]:
    """Split records by the peer that owns each target id, keeping their order.

    Returns a list of ``n_peers`` lists; list ``p`` holds, in input order, the records
    whose ``target_id`` (field 1) falls in a key group owned by peer ``p``.
    """
    _check_parallelism(max_parallelism)
    if not 1 <= n_peers <= max_parallelism:
        raise ValueError(f"n_peers must be between 1 and max_parallelism ({max_parallelism}), got {n_peers}")
    out: list[list[Record]] = [[] for _ in range(n_peers)]
    for rec in records:
        kg = stable_hash(rec[1].encode("utf-8")) % max_parallelism
        out[kg * n_peers // max_parallelism].append(rec)
    return out


def _check_record(rec: object) -> Record:
    if type(rec) is not tuple or len(rec) != RECORD_FIELDS:
        raise TypeError(f"a record must be a tuple of {RECORD_FIELDS} fields, got {rec!r:.80}")
    for i in range(5):
        if type(rec[i]) is not str:
            raise TypeError(f"record field {i} must be str, got {type(rec[i]).__name__}")
    if type(rec[5]) is not bytes:
        raise TypeError(f"record field 5 (value) must be bytes, got {type(rec[5]).__name__}")
    for i in (6, 7):
        v = rec[i]
        if type(v) is not int or v < 0 or v > _M64:
            raise TypeError(f"record field {i} must be an int in [0, 2**64), got {v!r}")
    return rec


def record_size(record: Record) -> int:
    """Return the encoded size of one record in a batch frame (the record is checked
    as :meth:`BatchEncoder.append` checks it)."""
    return len(msgpack.packb(_check_record(record), use_bin_type=True))


def _array_head_size(n: int) -> int:
    """Size of the array header of a batch of ``n`` records (fixarray/array16/array32)."""
    return 1 if n < 16 else 3 if n < 0x10000 else 5


class BatchEncoder:
    """Accumulates records and produces one batch frame.

    ``append`` validates and encodes a record at once, so a bad record fails at the
    call that added it and never poisons a frame.
    """

    __slots__ = ("_count", "_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._count = 0
        self._size = 0

    def append(self, record: Record) -> None:
        """Encode one record into the pending batch."""
        part = msgpack.packb(_check_record(record), use_bin_type=True)
        self._parts.append(part)
        self._count += 1
        self._size += len(part)

    def extend(self, records: Iterable[Record]) -> None:
        """Append every record, in order."""
        for rec in records:
            self.append(rec)

    def fill(self, records: Sequence[Record], start: int = 0, max_bytes: int = 0, max_records: int = 0) -> int:
        """Append ``records[start:]``, in order, while the frame stays within limits.

        Stops before the first record that would make the frame (header included)
        larger than ``max_bytes`` or hold more than ``max_records`` records (0: no
        limit). Returns the index of the first record not appended (``len(records)``
        when all were). A record that does not fit even an empty frame is not
        appended either: the caller sees the index unchanged on an empty encoder.
        """
        start, max_bytes, max_records = (operator.index(v) for v in (start, max_bytes, max_records))
        if start < 0 or max_bytes < 0 or max_records < 0:
            raise ValueError("start, max_bytes and max_records must be >= 0")
        n = len(records)
        if start > n:
            raise ValueError(f"start ({start}) is past the end of the records ({n})")
        i = start
        while i < n:
            if max_records > 0 and self._count >= max_records:
                break
            part = msgpack.packb(_check_record(records[i]), use_bin_type=True)
            if max_bytes > 0 and 2 + _array_head_size(self._count + 1) + self._size + len(part) > max_bytes:
                break
            self._parts.append(part)
            self._count += 1
            self._size += len(part)
            i += 1
        return i

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Encoded size of the pending records, without the frame header."""
        return self._size

    @property
    def frame_size(self) -> int:
        """Size of the frame :meth:`flush` would return now (header included)."""
        return 2 + _array_head_size(self._count) + self._size

    def flush(self) -> bytes:
        """Return the frame for the pending records and start a new, empty batch."""
        n = self._count
        if n < 16:
            head = bytes((0x90 | n,))
        elif n < 0x10000:
            head = b"\xdc" + n.to_bytes(2, "big")
        else:
            head = b"\xdd" + n.to_bytes(4, "big")
        frame = b"".join((_HEADER, head, *self._parts))
        self._parts = []
        self._count = 0
        self._size = 0
        return frame

    def flush_room(self, room: int) -> bytearray:
        """:meth:`flush`'s frame as a ``bytearray`` after ``room`` zero bytes, where the
        sender writes the frame's envelope in place (``codec.seal_envelope``)."""
        room = operator.index(room)
        if room < 0:
            raise ValueError("room must be >= 0")
        frame = bytearray(room)
        frame += self.flush()
        return frame


def encode_batch(records: Iterable[Record]) -> bytes:
    """Return the batch frame for ``records``."""
    enc = BatchEncoder()
    enc.extend(records)
    return enc.flush()


def decode_batch(frame: bytes | bytearray | memoryview) -> list[Record]:
    """Decode a batch frame into records.

    Raises:
        FrameDecodeError: the frame is not exactly a version-1 batch frame of
            well-formed records, with what was wrong in the message.
    """
    if type(frame) is not bytes:
        frame = memoryview(frame).tobytes()  # a TypeError for non-buffers, like the C core
    if len(frame) < 3:
        raise FrameDecodeError(f"batch frame truncated: {len(frame)} bytes")
    if frame[0] != FRAME_VERSION:
        raise FrameDecodeError(f"unsupported frame version {frame[0]} (this peer speaks version {FRAME_VERSION})")
    if frame[1] != KIND_BATCH:
        raise FrameDecodeError(f"not a batch frame: kind 0x{frame[1]:02x}")
    try:
        body = msgpack.unpackb(memoryview(frame)[2:], raw=False, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated classes
        raise FrameDecodeError(f"batch frame body is not valid msgpack: {exc}") from exc
    if type(body) is not tuple:
        raise FrameDecodeError("batch frame body is not an array")
    for idx, rec in enumerate(body):
        if type(rec) is not tuple or len(rec) != RECORD_FIELDS:
            raise FrameDecodeError(f"record {idx} is not an array of {RECORD_FIELDS} items")
        for i in range(5):
            if type(rec[i]) is not str:
                raise FrameDecodeError(f"record {idx} field {i} is not a string")
        if type(rec[5]) is not bytes:
            raise FrameDecodeError(f"record {idx} field 5 (value) is not binary")
        for i in (6, 7):
            if type(rec[i]) is not int or rec[i] < 0:
                raise FrameDecodeError(f"record {idx} field {i} is not an unsigned integer")
    return list(body)
