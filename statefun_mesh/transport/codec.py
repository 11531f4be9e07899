"""Control frames between peers and between clients and peers (msgpack with a version byte).

Every frame starts with ``VERSION (1 byte) | KIND (1 byte)``. Batches of messages
(``KIND_BATCH``) have the body the hot-path core encodes (see ``_speedups_py``); every
other kind has a msgpack array body whose shape this module checks. A frame of another
version, an unknown kind or a body of the wrong shape is a
:class:`~statefun_mesh.errors.FrameDecodeError` naming what was wrong.

Peer ↔ peer kinds: ``BATCH``, ``CREDIT [n]``, ``HEARTBEAT [peer, incarnation]``,
``REPLIES [[request_id, status, kind, value, replier_type, replier_id], ...]``, and for
checkpoints ``BARRIER [n, last_complete]``, ``CK_ACK [n, part, error]``, ``CK_DONE [n]``,
``CK_ABORT [n]``, ``RECOVER [generation, n]``, ``READY [generation]``,
``RESUME [generation]``, ``RESTORE_FAILED [generation, n, reason]``, ``REPLAYED [generation]`` (sent on
every channel after the messages a peer replayed in a recovery round). Between peers every frame travels in
an *envelope*, one ZeroMQ message: a u32 big-endian word whose low 31 bits are the sender's generation
(see ``snapshot/coordinator.py``) and whose top bit says that a credit grant follows (u32 big-endian,
records: what a ``CREDIT [n]`` frame sent just before this one would say), then the frame
(:func:`envelope`, :func:`seal_envelope`, :func:`open_envelope`; docs/architecture.md §5).

Client → peer: ``C_SEND [corr, typename, id, value_typename, value, idempotency_key]``,
``C_REQUEST [corr, typename, id, value_typename, value, timeout_s]``,
``C_FETCH [corr, egress, start, max_records, wait_ms, generation]`` (``start``: offset,
``"earliest"`` or ``"latest"``; ``generation``: the peer generation ``start`` was read in,
-1 if none), ``C_INFO [corr]``.

Peer → client: ``R_ACK [corr]``, ``R_REPLY [corr, replier_type, replier_id, value_typename,
value]``, ``R_ERROR [corr, error_class, message, args]``, ``R_RECORDS [corr, peer, next_offset,
[[offset, value_typename, value(, id)], ...], generation]``, ``R_INFO [corr, info_map]``.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from .._speedups import FRAME_VERSION, KIND_BATCH
from ..errors import FrameDecodeError

__all__ = [
    "CREDIT_FOLLOWS",
    "ENVELOPE_MAX",
    "GENERATION_MASK",
    "encode_reply_frames",
    "envelope",
    "open_envelope",
    "seal_envelope",
    "BARRIER",
    "CK_ABORT",
    "CK_ACK",
    "CK_DONE",
    "READY",
    "RECOVER",
    "RESUME",
    "RESTORE_FAILED",
    "REPLAYED",
    "C_FETCH",
    "C_INFO",
    "C_REQUEST",
    "C_SEND",
    "CREDIT",
    "HEARTBEAT",
    "KIND_BATCH",
    "REPLIES",
    "R_ACK",
    "R_ERROR",
    "R_INFO",
    "R_RECORDS",
    "R_REPLY",
    "decode_control",
    "encode_control",
    "frame_kind",
]

CREDIT: Final = 0x02
HEARTBEAT: Final = 0x03
REPLIES: Final = 0x04
BARRIER: Final = 0x05
CK_ACK: Final = 0x06
CK_DONE: Final = 0x07
CK_ABORT: Final = 0x08
RECOVER: Final = 0x09
READY: Final = 0x0A
RESUME: Final = 0x0B
RESTORE_FAILED: Final = 0x0C
REPLAYED: Final = 0x0D
C_SEND: Final = 0x10
C_REQUEST: Final = 0x11
C_FETCH: Final = 0x12
C_INFO: Final = 0x13
R_ACK: Final = 0x20
R_REPLY: Final = 0x21
R_ERROR: Final = 0x22
R_RECORDS: Final = 0x23
R_INFO: Final = 0x24

#: the envelope's first word: bit 31 set when a credit grant follows, the generation below it
CREDIT_FOLLOWS: Final = 0x80000000
GENERATION_MASK: Final = 0x7FFFFFFF
_WORD = struct.Struct(">I")
_WORDS = struct.Struct(">II")
#: the most bytes an envelope puts before a frame (generation and a credit grant)
ENVELOPE_MAX: Final = _WORDS.size
_NO_ROOM = bytes(ENVELOPE_MAX)

_S = str
_B = bytes
_I = int
#: kind -> (name, item types); ``object`` items are checked by the handler.
_SHAPES: Final[dict[int, tuple[str, tuple[Any, ...]]]] = {
    CREDIT: ("CREDIT", (_I,)),
    HEARTBEAT: ("HEARTBEAT", (_I, _I)),
    REPLIES: ("REPLIES", (list,)),
    BARRIER: ("BARRIER", (_I, _I)),
    CK_ACK: ("CK_ACK", (_I, (dict, type(None)), (str, type(None)))),
    CK_DONE: ("CK_DONE", (_I,)),
    CK_ABORT: ("CK_ABORT", (_I,)),
    RECOVER: ("RECOVER", (_I, _I)),
    READY: ("READY", (_I,)),
    RESUME: ("RESUME", (_I,)),
    RESTORE_FAILED: ("RESTORE_FAILED", (_I, _I, _S)),
    REPLAYED: ("REPLAYED", (_I,)),
    C_SEND: ("SEND", (_I, _S, _S, _S, _B, _S)),
    C_REQUEST: ("REQUEST", (_I, _S, _S, _S, _B, (int, float))),
    C_FETCH: ("FETCH", (_I, _S, (int, str), _I, _I, _I)),
    C_INFO: ("INFO", (_I,)),
    R_ACK: ("ACK", (_I,)),
    R_REPLY: ("REPLY", (_I, _S, _S, _S, _B)),
    R_ERROR: ("ERROR", (_I, _S, _S, list)),
    R_RECORDS: ("RECORDS", (_I, _I, _I, list, _I)),
    R_INFO: ("INFO", (_I, dict)),
}


def frame_kind(frame: bytes | memoryview) -> int:
    """Return the kind byte of a frame after checking its version.

    Raises:
        FrameDecodeError: too short, or another version.
    """
    if len(frame) < 2:
        raise FrameDecodeError(f"frame truncated: {len(frame)} bytes")
    if frame[0] != FRAME_VERSION:
        raise FrameDecodeError(
            f"unsupported frame version {frame[0]} (this peer speaks version {FRAME_VERSION}); "
            "is the sender a statefun_mesh of another release?"
        )
    return frame[1]


def encode_control(kind: int, *items: Any) -> bytes:
    """Encode a control frame of ``kind`` with ``items`` as its body."""
    body: bytes = msgpack.packb(items, use_bin_type=True)
    return bytes((FRAME_VERSION, kind)) + body


def decode_control(frame: bytes | memoryview, expect: frozenset[int] | None = None) -> tuple[int, list[Any]]:
    """Decode a control frame into ``(kind, items)``, checking its shape.

    Args:
        frame: the whole frame.
        expect: kinds acceptable on this socket; another kind is an error.

    Raises:
        FrameDecodeError: the frame is not a well-formed control frame of an expected kind.
    """
    kind = frame_kind(frame)
    shape = _SHAPES.get(kind)
    if shape is None or (expect is not None and kind not in expect):
        raise FrameDecodeError(f"unexpected frame kind 0x{kind:02x} on this socket")
    name, types = shape
    try:
        items = msgpack.unpackb(memoryview(frame)[2:], raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated classes
        raise FrameDecodeError(f"{name} frame body is not valid msgpack: {exc}") from exc
    if type(items) is not list or len(items) != len(types):
        raise FrameDecodeError(f"{name} frame body must be an array of {len(types)} items")
    for i, (item, tp) in enumerate(zip(items, types, strict=True)):
        if isinstance(item, bool) or not isinstance(item, tp):
            raise FrameDecodeError(f"{name} frame item {i} has the wrong type ({type(item).__name__})")
    return kind, items


def encode_reply_frames(replies: list[Any], limit: int, room: bool = False) -> list[Any]:
    """``REPLIES`` frames for ``replies``, each at most ``limit`` bytes (a reply that is
    larger alone was refused when it was made: ``context.reply`` checks its size).
    ``room``: each frame a ``bytearray`` after :data:`ENVELOPE_MAX` free bytes, for
    :func:`seal_envelope` (else ``bytes``)."""
    head = bytes((FRAME_VERSION, REPLIES)) + b"\x91"  # [[reply, ...]]
    frames: list[Any] = []
    parts: list[bytes] = []
    size = 0
    for reply in replies:
        part = msgpack.packb(reply, use_bin_type=True)
        if parts and len(head) + 5 + size + len(part) > limit:
            frames.append(_replies_frame(head, parts, room))
            parts, size = [], 0
        parts.append(part)
        size += len(part)
    if parts:
        frames.append(_replies_frame(head, parts, room))
    return frames


def _replies_frame(head: bytes, parts: list[bytes], room: bool = False) -> bytes | bytearray:
    n = len(parts)
    if n < 16:
        count = bytes((0x90 | n,))  # fixarray
    elif n < 0x10000:
        count = b"\xdc" + n.to_bytes(2, "big")  # array16
    else:
        count = b"\xdd" + n.to_bytes(4, "big")  # array32
    if room:
        return bytearray().join((_NO_ROOM, head, count, *parts))
    return b"".join((head, count, *parts))


# -- the envelope of frames between peers ------------------------------------------------


def envelope(generation: int, credit: int = 0) -> bytes:
    """The envelope's head for a frame sent in ``generation``, carrying a grant of ``credit``
    records (0: none; at most ``0xFFFFFFFF``).

    Raises:
        ValueError: a generation over 31 bits (its top bit would read as a grant).
    """
    if generation > GENERATION_MASK:
        raise ValueError(f"generation {generation} does not fit an envelope (at most {GENERATION_MASK})")
    if credit:
        return _WORDS.pack(generation | CREDIT_FOLLOWS, credit)
    return _WORD.pack(generation)


def seal_envelope(frame: bytearray, generation: int, credit: int = 0) -> bytearray | memoryview:
    """Write the envelope's head in place into ``frame``'s first :data:`ENVELOPE_MAX` bytes
    (left free by the encoder that built it) and return the envelope to send: no copy of
    the frame, unlike ``head + frame``. Raises ``ValueError`` as :func:`envelope` does."""
    if generation > GENERATION_MASK:
        raise ValueError(f"generation {generation} does not fit an envelope (at most {GENERATION_MASK})")
    if credit:
        _WORDS.pack_into(frame, 0, generation | CREDIT_FOLLOWS, credit)
        return frame
    _WORD.pack_into(frame, 4, generation)
    return memoryview(frame)[4:]


def open_envelope(data: bytes) -> tuple[int, int | None, bytes | memoryview]:
    """Split an envelope into ``(generation, credit granted or None, frame)``. The frame is
    a view, not a copy, when it is large.

    Raises:
        FrameDecodeError: too short to hold its head and a frame's version and kind.
    """
    size = len(data)
    if size >= 6:
        word = _WORD.unpack_from(data)[0]
        if not word & CREDIT_FOLLOWS:
            return word, None, (data[4:] if size < 4096 else memoryview(data)[4:])
        if size >= 10:
            credit = _WORD.unpack_from(data, 4)[0]
            return word & GENERATION_MASK, credit, (data[8:] if size < 4096 else memoryview(data)[8:])
    raise FrameDecodeError(f"{size} bytes is too short for a frame between peers")
