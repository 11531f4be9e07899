"""Type stub of the Cython core (csrc/_speedups_c.pyx); the spec is ``_speedups_py``."""

from collections.abc import Iterable
from typing import Final, TypeAlias

from typing_extensions import Buffer, disjoint_base

__all__ = [
    "FRAME_VERSION",
    "KIND_BATCH",
    "BatchEncoder",
    "Record",
    "decode_batch",
    "encode_batch",
    "key_group",
    "key_groups",
    "partition",
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
    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def flush(self) -> bytes: ...

def encode_batch(records: Iterable[Record]) -> bytes: ...
def decode_batch(frame: Buffer) -> list[Record]: ...
