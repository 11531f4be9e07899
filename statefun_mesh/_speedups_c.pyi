"""Type stub of the Cython core (csrc/_speedups_c.pyx); the spec is ``_speedups_py``."""

from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeAlias

from typing_extensions import Buffer, disjoint_base

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
    "key_group",
    "key_groups",
    "partition",
    "record_size",
    "stable_hash",
]

FRAME_VERSION: Final[int]
KIND_BATCH: Final[int]

#: One message on the wire: (target_typename, target_id, caller_typename, caller_id,
#: value_typename, value, reply_peer, request_id).
Record: TypeAlias = tuple[str, str, str, str, str, bytes, int, int]

def stable_hash(data: Buffer) -> int: ...
def key_group(id: str, max_parallelism: int) -> int: ...
def key_groups(ids: Iterable[str], max_parallelism: int) -> list[int]: ...
def partition(records: Iterable[Record], max_parallelism: int, n_peers: int) -> list[list[Record]]: ...

@disjoint_base  # a cdef class: its C layout cannot be combined with another base
class BatchEncoder:
    def __init__(self) -> None: ...
    def append(self, record: Record) -> None: ...
    def extend(self, records: Iterable[Record]) -> None: ...
    def fill(self, records: Sequence[Record], start: int = 0, max_bytes: int = 0, max_records: int = 0) -> int: ...
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def frame_size(self) -> int: ...
    def flush(self) -> bytes: ...
    def flush_room(self, room: int) -> bytearray: ...

def record_size(record: Record) -> int: ...
def encode_batch(records: Iterable[Record]) -> bytes: ...
def decode_batch(frame: Buffer) -> list[Record]: ...

# the dispatcher's per-batch loop, compiled from statefun_mesh/_dispatch_loop.py (its spec)
def group_records(records: list[Any]) -> dict[Any, Any]: ...
def dispatch_groups(
    d: Any,
    kit: tuple[Any, ...],
    groups: dict[Any, Any],
    txn: Any,
    now_ms: Any,
    out: Any,
    max_send_bytes: Any,
    merging: dict[Any, Any],
    starting: list[Any],
    touched: list[Any],
) -> Any: ...
def collect_puts(touched: list[Any], ops: list[Any], encode: Any) -> None: ...
