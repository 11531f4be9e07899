"""Checkpoint objects and manifests: their byte formats, names and validation.

A checkpoint ``n`` is a manifest ``checkpoints/<n>/manifest.json`` naming, for each
peer, the chain of state objects that rebuild its key groups (one ``base`` and the
``delta`` objects after it, oldest first) and one ``inflight`` object with the
messages that were in flight across the cut. The manifest is written last, after
every object it names: a checkpoint without a manifest does not exist.

State object::

    b"SMCKPT" | format (u8 = 1) | kind (u8: 1 base, 2 delta, 3 inflight)
    | msgpack header map | msgpack entries, one after another

A ``base``/``delta`` entry is ``[database, key, value or nil]`` (nil: deleted); an
``inflight`` entry is one message record (8 fields, as in a batch frame). Objects
are checked against the SHA-256 the manifest records before anything is restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Final

import msgpack

from ..errors import SnapshotError

__all__ = [
    "FORMAT",
    "KINDS",
    "Manifest",
    "ObjectRef",
    "PeerPart",
    "decode_object",
    "encode_object",
    "file_sha256",
    "manifest_name",
    "object_name",
    "open_object_file",
    "parse_manifest_name",
    "write_object",
]

MAGIC: Final = b"SMCKPT"
FORMAT: Final = 1
KINDS: Final = {"base": 1, "delta": 2, "inflight": 3}
_KIND_NAMES: Final = {v: k for k, v in KINDS.items()}
#: bytes an object is written and read in (what a checkpoint holds of one object at a time)
CHUNK: Final = 1 << 20
_MANIFEST_RE: Final = re.compile(r"^checkpoints/(\d{12})/manifest\.json$")


def manifest_name(checkpoint: int) -> str:
    """Blob name of checkpoint ``checkpoint``'s manifest."""
    return f"checkpoints/{checkpoint:012d}/manifest.json"


def parse_manifest_name(name: str) -> int | None:
    """The checkpoint id of a manifest blob name, or ``None`` for another name."""
    m = _MANIFEST_RE.match(name)
    return int(m.group(1)) if m else None


def object_name(peer: int, checkpoint: int, kind: str) -> str:
    """Blob name of one peer's ``kind`` object of one checkpoint."""
    return f"objects/peer-{peer:04d}/{checkpoint:012d}-{kind}.bin"


class PackedEntries:
    """``n`` entries already msgpack-encoded one after another (e.g. a spilled chunk)."""

    __slots__ = ("data", "n")

    def __init__(self, n: int, data: bytes) -> None:
        self.n = n
        self.data = data


def encode_object(kind: str, header: dict[str, Any], entries: Iterable[Any]) -> tuple[bytes, int]:
    """Encode an object; return ``(bytes, number of entries)``.

    An entry may be a :class:`PackedEntries`, copied as it is.
    """
    packer = msgpack.Packer(use_bin_type=True)
    # one growing buffer, not a list of small bytes objects (one per entry): a large
    # object then costs about its size once, and leaves no small-object fragmentation
    buf = bytearray(MAGIC)
    buf += bytes((FORMAT, KINDS[kind]))
    buf += packer.pack(header)
    n = 0
    for entry in entries:
        if type(entry) is PackedEntries:
            buf += entry.data
            n += entry.n
            continue
        buf += packer.pack(entry)
        n += 1
    return bytes(buf), n


def write_object(
    fh: IO[bytes], kind: str, header: dict[str, Any], entries: Iterable[Any], chunk: int = CHUNK
) -> tuple[int, int, str]:
    """Encode an object into the binary file ``fh`` in bounded memory (``chunk`` bytes
    buffered at a time, besides one entry); return ``(number of entries, size, SHA-256)``.

    The bytes are those :func:`encode_object` returns. An entry may be a :class:`PackedEntries`.
    """
    packer = msgpack.Packer(use_bin_type=True)
    digest = hashlib.sha256()
    buf = bytearray(MAGIC)
    buf += bytes((FORMAT, KINDS[kind]))
    buf += packer.pack(header)
    n = size = 0
    for entry in entries:
        if type(entry) is PackedEntries:
            buf += entry.data
            n += entry.n
        else:
            buf += packer.pack(entry)
            n += 1
        if len(buf) >= chunk:
            digest.update(buf)
            fh.write(buf)
            size += len(buf)
            buf.clear()  # keeps its allocation: no new buffer per chunk
    digest.update(buf)
    fh.write(buf)
    size += len(buf)
    return n, size, digest.hexdigest()


def file_sha256(path: str, chunk: int = CHUNK) -> str:
    """The SHA-256 of a file, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while k := fh.readinto(buf):
            digest.update(view[:k])
    return digest.hexdigest()


def open_object_file(
    path: str, *, sha256: str | None = None, name: str = "object"
) -> tuple[str, dict[str, Any], Iterator[Any]]:
    """Like :func:`decode_object` for an object in a file, read in bounded memory.

    The checksum is checked over the whole file first (one pass, ``CHUNK`` at a
    time), so nothing of a corrupted object is returned; then the entries are decoded
    as the returned iterator is consumed (it closes the file when exhausted or closed).

    Raises:
        SnapshotError: wrong magic, format or checksum, or a body that does not parse.
        OSError: the file cannot be read.
    """
    if sha256 is not None and file_sha256(path) != sha256:
        raise SnapshotError(f"{name} is corrupted: its SHA-256 does not match the manifest")
    fh = open(path, "rb")  # noqa: SIM115 - closed by entries() or on error below
    try:
        head = fh.read(8)
        if len(head) < 8 or head[:6] != MAGIC:
            raise SnapshotError(f"{name} is not a statefun_mesh checkpoint object")
        if head[6] != FORMAT:
            raise SnapshotError(f"{name} has object format {head[6]}; this statefun_mesh reads format {FORMAT}")
        kind = _KIND_NAMES.get(head[7])
        if kind is None:
            raise SnapshotError(f"{name} has unknown kind {head[7]}")
        # the buffer limit only caps one entry (a message or a state value), never the object
        size = os.fstat(fh.fileno()).st_size
        unpacker = msgpack.Unpacker(
            fh, raw=False, use_list=True, read_size=CHUNK, max_buffer_size=max(min(size, 1 << 31), CHUNK)
        )
        try:
            header = next(unpacker)
        except (StopIteration, ValueError, msgpack.UnpackException) as exc:
            raise SnapshotError(f"{name} has no readable header: {exc}") from exc
        if not isinstance(header, dict):
            raise SnapshotError(f"{name} has a malformed header")
    except BaseException:
        fh.close()
        raise

    def entries() -> Iterator[Any]:
        try:
            yield from unpacker
        except (ValueError, msgpack.UnpackException) as exc:
            raise SnapshotError(f"{name} is truncated or corrupted: {exc}") from exc
        finally:
            fh.close()

    return kind, header, entries()


def decode_object(
    data: bytes, *, sha256: str | None = None, name: str = "object"
) -> tuple[str, dict[str, Any], Iterator[Any]]:
    """Check and open an object: ``(kind, header, entries)``.

    Raises:
        SnapshotError: wrong magic, format or checksum, or a body that does not parse.
    """
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SnapshotError(f"{name} is corrupted: its SHA-256 does not match the manifest")
    if len(data) < 8 or data[:6] != MAGIC:
        raise SnapshotError(f"{name} is not a statefun_mesh checkpoint object")
    if data[6] != FORMAT:
        raise SnapshotError(f"{name} has object format {data[6]}; this statefun_mesh reads format {FORMAT}")
    kind = _KIND_NAMES.get(data[7])
    if kind is None:
        raise SnapshotError(f"{name} has unknown kind {data[7]}")
    unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(memoryview(data)[8:])
    try:
        header = next(unpacker)
    except (StopIteration, ValueError, msgpack.UnpackException) as exc:
        raise SnapshotError(f"{name} has no readable header: {exc}") from exc
    if not isinstance(header, dict):
        raise SnapshotError(f"{name} has a malformed header")

    def entries() -> Iterator[Any]:
        try:
            yield from unpacker
        except (ValueError, msgpack.UnpackException) as exc:
            raise SnapshotError(f"{name} is truncated or corrupted: {exc}") from exc

    return kind, header, entries()


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One object in the blob store: name, size and SHA-256."""

    name: str
    size: int
    sha256: str
    checkpoint: int
    kind: str
    entries: int = 0


@dataclass(frozen=True, slots=True)
class PeerPart:
    """One peer's share of a checkpoint."""

    peer: int
    key_groups: tuple[int, int]
    chain: tuple[ObjectRef, ...]
    inflight: ObjectRef
    ingress_position: int
    egress: dict[str, int] = field(default_factory=dict)
    #: positions in external sources at the cut (a Kafka partition's next offset: connectors/kafka.py)
    sources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A complete checkpoint."""

    checkpoint: int
    generation: int
    peers: int
    max_parallelism: int
    created_ms: int
    parts: tuple[PeerPart, ...]
    format: int = FORMAT

    def to_json(self) -> bytes:
        """The manifest as JSON bytes."""
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes, name: str = "manifest") -> Manifest:
        """Parse and validate a manifest.

        Raises:
            SnapshotError: not JSON, another format, or fields missing or inconsistent.
        """
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise SnapshotError(f"{name} does not parse as JSON: {exc}") from exc
        try:
            if doc["format"] != FORMAT:
                raise SnapshotError(f"{name} has format {doc['format']}; this statefun_mesh reads format {FORMAT}")
            parts = tuple(
                PeerPart(
                    peer=int(p["peer"]),
                    key_groups=(int(p["key_groups"][0]), int(p["key_groups"][1])),
                    chain=tuple(ObjectRef(**o) for o in p["chain"]),
                    inflight=ObjectRef(**p["inflight"]),
                    ingress_position=int(p["ingress_position"]),
                    egress={str(k): int(v) for k, v in p["egress"].items()},
                    sources={str(k): int(v) for k, v in p.get("sources", {}).items()},
                )
                for p in doc["parts"]
            )
            m = Manifest(
                checkpoint=int(doc["checkpoint"]),
                generation=int(doc["generation"]),
                peers=int(doc["peers"]),
                max_parallelism=int(doc["max_parallelism"]),
                created_ms=int(doc["created_ms"]),
                parts=parts,
            )
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SnapshotError(f"{name} is malformed: {exc!r}") from exc
        if sorted(p.peer for p in m.parts) != list(range(m.peers)):
            raise SnapshotError(f"{name} does not have exactly one part per peer")
        for p in m.parts:
            if not p.chain or p.chain[0].kind != "base":
                raise SnapshotError(f"{name}: the chain of peer {p.peer} does not start with a base object")
        return m
